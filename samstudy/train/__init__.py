"""One trial: ``run_trial(config, report, resume=None)``, its config, sharpness and checkpoints.

``samstudy.train.config`` stays importable on its own (study files validate trial configs without
building anything); ``run_trial`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samstudy.train.config import TrialConfig, load_trial_config

if TYPE_CHECKING:
    from samstudy.train.loop import run_trial

__all__ = ["TrialConfig", "load_trial_config", "run_trial"]


def __getattr__(name: str) -> Any:
    if name == "run_trial":
        from samstudy.train.loop import run_trial

        return run_trial
    raise AttributeError(f"module 'samstudy.train' has no attribute {name!r}")
