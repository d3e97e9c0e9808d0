"""How much disk a study's checkpoints take at peak, from the model and optimizer sizes.

A trial's checkpoint holds its model (parameters and buffers, fp32) and the base optimizer's
state: one buffer per parameter for SGD with momentum, two for AdamW, none for plain SGD (the
SAM family keeps nothing else between steps); the metric history and RNG states are small.
The model is built on torch's ``meta`` device, so nothing is allocated however large it is.

At peak each running trial has ``checkpoints.keep`` checkpoints plus the one being written, and
each finished trial keeps its last one only with ``checkpoints.keep_final``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samstudy.study.spec import StudySpec

BYTES_PER_VALUE = 4  # fp32 weights and optimizer state
OVERHEAD_BYTES = 256 * 1024  # history, RNG states, the config, Tune's result files per trial


def data_shape(data: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a trial's data set."""
    name = data.get("name", "digits")
    if name.startswith("cifar"):
        return (3, 32, 32), 100 if name == "cifar100" else 10
    if name == "gaussian":
        synthetic = data.get("synthetic", {})
        return (int(synthetic.get("dim", 32)),), int(synthetic.get("num_classes", 2))
    return (1, 8, 8), 10  # digits


def model_values(config: Mapping[str, Any]) -> int:
    """Parameters plus buffers of a trial's model (built on the meta device)."""
    import torch

    from samstudy.models import create_model

    in_shape, classes = data_shape(config.get("data", {}))
    model = config.get("model", {})
    with torch.device("meta"):
        net = create_model(model.get("name", "mlp"), classes, in_shape, **model.get("kwargs", {}))
    return sum(t.numel() for t in net.parameters()) + sum(t.numel() for t in net.buffers())


def optimizer_copies(optimizer: Mapping[str, Any]) -> int:
    """Per-parameter state tensors of the base optimizer (see the module docstring)."""
    if optimizer.get("base", "sgd") == "adamw":
        return 2
    return 1 if float(optimizer.get("momentum", 0.0)) > 0 else 0


def checkpoint_bytes(config: Mapping[str, Any]) -> int:
    """The size of one checkpoint of a trial."""
    values = model_values(config) * (1 + optimizer_copies(config.get("optimizer", {})))
    return values * BYTES_PER_VALUE + OVERHEAD_BYTES


@dataclass(frozen=True)
class DiskEstimate:
    """A study's checkpoint disk at peak (bytes) and what it is made of."""

    peak_bytes: int
    largest_checkpoint: int
    running: int  # trials at once assumed
    keep: int
    keep_final: bool

    def summary(self, storage: str = "the storage path") -> str:
        """One line for ``plan``."""
        kept = f"the last {self.keep}" if self.keep > 1 else "the last"
        final = "the final one" if self.keep_final else "none"
        kind = "storage" if "://" in storage else "disk"  # a bucket (s3://) has no disk to fill
        return (
            f"{kind} for checkpoints at peak: ~{_size(self.peak_bytes)} in {storage} "
            f"({_size(self.largest_checkpoint)} per checkpoint of the largest trial; "
            f"{self.running} trials at once keep {kept} each, finished trials keep {final})"
        )


def estimate_disk(spec: StudySpec, running: int) -> DiskEstimate:
    """Checkpoint disk at peak with ``running`` trials at once (see the module docstring)."""
    trials = [t.config for t in spec.expand()] or [spec.base.model_dump(mode="json")]
    sizes: dict[str, int] = {}
    for config in trials:  # one model build per distinct model, data and optimizer base
        key = repr((config.get("model"), config.get("data"), config.get("optimizer")))
        if key not in sizes:
            sizes[key] = checkpoint_bytes(config)
    per_trial = [sizes[repr((c.get("model"), c.get("data"), c.get("optimizer")))] for c in trials]
    if spec.search is not None:
        per_trial = per_trial * spec.search.num_samples
    per_trial.sort(reverse=True)
    keep, keep_final = spec.checkpoints.keep, spec.checkpoints.keep_final
    running = max(1, min(running, len(per_trial)))
    peak = sum(size * (keep + 1) for size in per_trial[:running])
    if keep_final:
        peak += sum(per_trial[running:])
    return DiskEstimate(peak, per_trial[0], running, keep, keep_final)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
