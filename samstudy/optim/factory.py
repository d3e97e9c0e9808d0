"""``create_optimizer``: the typed ``optimizer:`` mapping (``samstudy.optim.config``) -> optimizer.

``create_optimizer(params, name="same", lr=..., scales=[...])`` takes the knobs as keywords (the
mapping of a study file), ``create_optimizer(params, config)`` a validated config. Missing knobs
take the defaults of ``samstudy.optim.config``: torch's own for the base optimizer (a trial
config adds the lab's recipe, ``RECIPE``, before it gets here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from samstudy.optim.ascent import AscentConfig
from samstudy.optim.config import OptimizerBase, parse_optimizer_config
from samstudy.optim.step import SamOptimizer

BASE_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


def create_optimizer(
    params: Any, config: OptimizerBase | Mapping[str, Any] | str | None = None, /, **knobs: Any
) -> SamOptimizer:
    """Build the optimizer of an ``optimizer:`` mapping over ``params``.

    ``params``: tensors, param-group dicts, or ``(name, tensor)`` pairs (``named_parameters()``;
    names label the per-tensor statistics). The knobs come as ``config`` (typed or a mapping) or
    as keywords (``name``, ``base``, ``lr``, ``rho``, ...), not both; a string ``config`` is the
    preset name, as the second argument of earlier versions was. Use
    ``opt.train_step(model, loss_fn, x, y)`` for every preset; ``opt.two_step`` is False only
    for ``sgd``. A bad knob raises ``ValueError`` naming it and what is allowed.
    """
    if isinstance(config, str):
        config, knobs = None, {"name": config, **knobs}
    if config is not None and knobs:
        raise TypeError("create_optimizer: give the knobs as a config or as keywords, not both")
    spec = parse_optimizer_config(config if config is not None else knobs)
    clamp_rms, clamp_quantile = spec.clamp_threshold()
    return SamOptimizer(
        params,
        BASE_CLASSES[spec.base],
        {"lr": spec.lr, **spec.base_kwargs()},
        name=spec.name,
        two_step=spec.two_step,
        table=spec.region_table(),
        rho=spec.rho,
        ascent_cfg=AscentConfig(
            kind=spec.ascent,
            eta=spec.eta,
            clamp_rms=clamp_rms,
            clamp_quantile=clamp_quantile,
            clamp_renorm=spec.clamp_renorm,
        ),
        m=spec.m,
        second_grad=spec.second_grad,
        stats=spec.stats,
        stats_every=spec.stats_every,
        compile=spec.compile,
    )
