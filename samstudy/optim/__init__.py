"""SAM-family optimizers: every variant of the lab notes as a configuration of three axes.

* ascent (``sam`` | ``adaptive`` | ``clamp``, optionally per micro-batch of ``m`` examples),
* second gradient (``full`` | ``jacobian`` | ``logit``),
* combination d = a_k g_p + b_k g by region of g_p / g (the registered presets, ``PRESETS``).

``create_optimizer(params, name=..., base=..., lr=..., rho=..., **knobs)`` builds one;
``opt.train_step(model, loss_fn, inputs, targets)`` is the one code path of a training step.
See docs/optimizers.md for every formula.

The registry and the typed config (``presets``, ``config``) import pydantic only; what needs
torch is imported on first use, so validating a study file does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from samstudy.optim.config import (
    ASCENTS,
    BASE_KNOBS,
    BASES,
    RECIPE,
    SECOND_GRADS,
    OptimizerBase,
    OptimizerConfig,
    check_optimizer_config,
    parse_optimizer_config,
    preset_table,
)
from samstudy.optim.presets import PRESETS, REGION_KEYS, REGIONS, Preset, register_preset

# name -> module of the torch-backed parts
_LAZY = {
    "AscentConfig": "samstudy.optim.ascent",
    "RegionRule": "samstudy.optim.rules",
    "region_index": "samstudy.optim.rules",
    "SAM": "samstudy.optim.sam",
    "STAT_KEYS": "samstudy.optim.stats",
    "SamOptimizer": "samstudy.optim.step",
    "create_optimizer": "samstudy.optim.factory",
    "bn": "samstudy.optim.bn",
}

__all__ = [
    "ASCENTS",
    "BASES",
    "BASE_KNOBS",
    "PRESETS",
    "RECIPE",
    "REGIONS",
    "REGION_KEYS",
    "SECOND_GRADS",
    "OptimizerBase",
    "OptimizerConfig",
    "Preset",
    "check_optimizer_config",
    "parse_optimizer_config",
    "preset_table",
    "register_preset",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'samstudy.optim' has no attribute {name!r}")
    if name == "bn":
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)
