"""BatchNorm helpers: keep the second (perturbed) forward pass from updating running statistics.

SAM evaluates the model twice per step. Only the first pass, at the weights w, should move the
BatchNorm running mean and variance. We switch ``track_running_stats`` off for the second pass
instead of the popular port's ``momentum = 0`` trick: in training mode the output is the same
(batch statistics either way), but nothing is written at all, so ``num_batches_tracked`` and the
cumulative average of ``momentum=None`` layers stay exact too. In eval mode the flag change makes
no difference (running statistics are used either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _NormBase

_BACKUP = "_samstudy_tracked"


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop every BatchNorm/InstanceNorm layer of ``model`` from updating its running statistics."""
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            setattr(module, _BACKUP, True)
            module.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats` (layers that never tracked statistics stay as they were)."""
    for module in model.modules():
        if isinstance(module, _NormBase) and getattr(module, _BACKUP, False):
            module.track_running_stats = True
            delattr(module, _BACKUP)


@contextmanager
def running_stats_frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager: running statistics are frozen inside, restored on exit (even on error)."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
