"""Learning-rate schedules, stepped once per optimizer step (not per epoch).

A ``LambdaLR`` over a plain closure keeps the scheduler's ``state_dict`` to numbers and lists
(the closure itself is rebuilt from the config), so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch

from samstudy.train.config import ScheduleConfig


def lr_factor(
    schedule: ScheduleConfig, *, base_lr: float, steps_per_epoch: int, epochs: int
) -> Callable[[int], float]:
    """Multiplier of the base lr for optimizer step ``step`` (0-based), warmup included.

    Warmup rises linearly from ``1 / warmup_steps`` to 1; cosine then decays from the base lr to
    ``min_lr`` over the remaining steps; step multiplies by ``gamma`` at each milestone epoch.
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total, round(schedule.warmup_epochs * steps_per_epoch))
    floor = schedule.min_lr / base_lr if base_lr > 0 else 0.0
    milestones = sorted(schedule.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.name == "constant":
            return 1.0
        if schedule.name == "step":
            epoch = step // steps_per_epoch  # 0-based epoch this step belongs to
            return schedule.gamma ** bisect.bisect_right(milestones, epoch)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: ScheduleConfig,
    *,
    steps_per_epoch: int,
    epochs: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` on ``optimizer`` (its first group's lr is the base lr)."""
    base_lr = float(optimizer.param_groups[0]["lr"])
    factor = lr_factor(schedule, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
