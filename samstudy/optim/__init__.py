"""SAM-family optimizers: every variant of the lab notes as a configuration of three axes.

* ascent (``sam`` | ``adaptive`` | ``clamp``, optionally per micro-batch of ``m`` examples),
* second gradient (``full`` | ``jacobian`` | ``logit``),
* combination d = a_k g_p + b_k g by region of g_p / g (the presets of ``PRESETS``).

``create_optimizer(params, name=..., base=..., lr=..., rho=..., **knobs)`` builds one;
``opt.train_step(model, loss_fn, inputs, targets)`` is the one code path of a training step.
See docs/optimizers.md for every formula.
"""

from samstudy.optim import bn
from samstudy.optim.ascent import ASCENTS, AscentConfig
from samstudy.optim.factory import (
    BASE_KNOBS,
    BASES,
    OptimizerSpec,
    check_optimizer_config,
    create_optimizer,
    parse_optimizer_config,
)
from samstudy.optim.rules import (
    PRESETS,
    REGION_KEYS,
    REGIONS,
    RegionRule,
    preset_table,
    region_index,
)
from samstudy.optim.sam import SAM
from samstudy.optim.stats import STAT_KEYS
from samstudy.optim.step import SECOND_GRADS, SamOptimizer

__all__ = [
    "ASCENTS",
    "BASES",
    "BASE_KNOBS",
    "PRESETS",
    "REGIONS",
    "REGION_KEYS",
    "SAM",
    "SECOND_GRADS",
    "STAT_KEYS",
    "AscentConfig",
    "OptimizerSpec",
    "RegionRule",
    "SamOptimizer",
    "bn",
    "check_optimizer_config",
    "create_optimizer",
    "parse_optimizer_config",
    "preset_table",
    "region_index",
]
