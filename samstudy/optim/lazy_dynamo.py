"""torch.optim without importing torch._dynamo until something may compile.

``torch.optim.Optimizer`` wraps ``add_param_group``, ``state_dict``, ``load_state_dict`` and
``zero_grad`` in ``torch._disable_dynamo``, which imports ``torch._dynamo`` on the first call
(0.8-1 s of CPU here, with sympy) only to keep these methods out of compiled graphs. A Ray
trial worker pays that once per process before its first epoch: about 7% of a 12-epoch
quickstart study on two cores.

Nothing can be compiling before ``torch._dynamo`` has been imported, so until then the methods
run as they are. torch caches its wrapper in the function's ``__dynamo_disable`` attribute; we
put a stand-in there that calls the method directly while ``torch._dynamo`` is absent, and on
the first call after it has been imported (``torch.compile`` anywhere in the process) removes
itself, so torch's own wrapper takes over from then on.

What it saves depends on the step: torch's own optimizer ``step`` imports ``torch._dynamo``
too (``_use_grad_for_differentiable``), so only steps that do not call it, samstudy's C SGD step
(``native.sgd_step``: CPU, float32/64, no foreach), go without it; any other base optimizer
imports it at its first step, as before. Until it is imported, the two things its import does
to the rest of torch do not happen either: a safe global for ``torch.load(weights_only=True)``
of nested-tensor checkpoints, and a ``torch.manual_seed`` that compiled code may call; neither
concerns a process that does not compile or load such checkpoints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

# The torch.optim.Optimizer methods that torch._disable_dynamo wraps.
METHODS = ("add_param_group", "state_dict", "load_state_dict", "zero_grad")
_CACHE = "__dynamo_disable"  # torch._compile._disable_dynamo's cache attribute


def defer_dynamo_import() -> list[str]:
    """Let ``torch.optim.Optimizer``'s wrapped methods run without importing ``torch._dynamo``
    while it is not imported yet. Idempotent; returns the methods deferred by this call (none
    when ``torch._dynamo`` is already imported or torch wraps them in another way)."""
    if "torch._dynamo" in sys.modules:
        return []
    deferred = []
    for name in METHODS:
        method = getattr(torch.optim.Optimizer, name)
        fn = getattr(method, "__wrapped__", None)
        code = getattr(method, "__code__", None)
        if fn is None or code is None or not code.co_filename.endswith("_compile.py"):
            continue  # not torch._disable_dynamo's wrapper (another torch version): leave it
        if getattr(fn, _CACHE, None) is not None:
            continue  # torch's wrapper or our stand-in is there already
        setattr(fn, _CACHE, _stand_in(method, fn))
        deferred.append(name)
    return deferred


def _stand_in(method: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:  # something may compile from now on: torch's way
            if fn.__dict__.get(_CACHE) is call:
                # pop, not delattr: another thread may have removed it in between; one that
                # removes torch's wrapper instead costs only its rebuilding on the next call
                fn.__dict__.pop(_CACHE, None)
            return method(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
