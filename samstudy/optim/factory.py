"""``create_optimizer`` and ``check_optimizer_config``: the ``optimizer:`` mapping of a study file.

The mapping is ``name`` (a preset), ``base`` (``sgd`` | ``adamw``), ``lr``, ``rho`` and knobs:

* base knobs: sgd: ``momentum``, ``weight_decay``, ``nesterov``, ``dampening``;
  adamw: ``betas``, ``eps``, ``weight_decay`` (torch's defaults when absent);
* preset knobs: ``scales`` (same, custom_same), ``alpha`` (saner), ``region`` (sgd_on_region),
  ``coefficients`` (table);
* two-step knobs (every preset but ``sgd``): ``ascent``, ``eta`` (adaptive), ``clamp_rms`` /
  ``clamp_quantile`` / ``clamp_renorm`` (clamp), ``m``, ``second_grad``;
* everywhere: ``stats``, ``stats_every``, ``compile``.

Every problem raises ``ValueError`` naming the knob and what is allowed. ``rho`` is accepted and
ignored by ``sgd`` so that one defaults mapping serves every preset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from samstudy.optim.ascent import ASCENTS, DEFAULT_CLAMP_RMS, AscentConfig
from samstudy.optim.rules import COMPILE_MODES, PRESETS, Table, check_table, preset_table
from samstudy.optim.step import SECOND_GRADS, SamOptimizer

BASES = ("sgd", "adamw")
BASE_KNOBS = {
    "sgd": ("momentum", "weight_decay", "nesterov", "dampening"),
    "adamw": ("betas", "eps", "weight_decay"),
}
PRESET_KNOBS = {
    "scales": ("same", "custom_same"),
    "alpha": ("saner",),
    "region": ("sgd_on_region",),
    "coefficients": ("table",),
}
TWO_STEP_KNOBS = (
    "ascent",
    "eta",
    "clamp_rms",
    "clamp_quantile",
    "clamp_renorm",
    "m",
    "second_grad",
)
COMMON_KNOBS = ("stats", "stats_every", "compile")
DEFAULTS: dict[str, Any] = {"name": "sam", "base": "sgd", "lr": 0.05, "rho": 0.05}
# Statistics on every 4th step (and the first after each read): the measurement costs about as
# much as a rule, which plain SAM does not otherwise need (see docs/optimizers.md).
DEFAULT_STATS_EVERY = 4


@dataclass(frozen=True)
class OptimizerSpec:
    """A validated ``optimizer:`` mapping."""

    name: str
    base: str
    lr: float
    rho: float
    table: Table
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    ascent: AscentConfig = AscentConfig()
    m: int | None = None
    second_grad: str = "full"
    stats: bool = True
    stats_every: int = DEFAULT_STATS_EVERY
    compile: bool | str = "auto"


def _bad(knob: str, what: str, value: Any) -> ValueError:
    return ValueError(f"optimizer.{knob}: expected {what}, got {value!r}")


def _number(knob: str, value: Any, what: str, ok=lambda v: True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(knob, what, value)
    if not math.isfinite(value) or not ok(value):
        raise _bad(knob, what, value)
    return float(value)


def _boolean(knob: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(knob, "true or false", value)
    return value


def _integer(knob: str, value: Any, what: str, ok=lambda v: True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise _bad(knob, what, value)
    return value


def _choice(knob: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"optimizer.{knob}: unknown {value!r}; allowed: {', '.join(allowed)}")
    return value


def parse_optimizer_config(mapping: Mapping[str, Any]) -> OptimizerSpec:
    """Validate an ``optimizer:`` mapping (missing name/base/lr/rho take ``DEFAULTS``)."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"optimizer: expected a mapping of knobs, got {mapping!r}")
    cfg = {**DEFAULTS, **mapping}
    name = _choice("name", cfg.pop("name"), PRESETS)
    base = _choice("base", cfg.pop("base"), BASES)
    lr = _number("lr", cfg.pop("lr"), "a number >= 0", lambda v: v >= 0)
    rho = _number("rho", cfg.pop("rho"), "a number >= 0", lambda v: v >= 0)

    allowed = [*BASE_KNOBS[base], *COMMON_KNOBS]
    allowed += [k for k, names in PRESET_KNOBS.items() if name in names]
    if name != "sgd":
        allowed += TWO_STEP_KNOBS
    for knob in cfg:
        if knob in allowed:
            continue
        if knob in PRESET_KNOBS:
            where = ", ".join(PRESET_KNOBS[knob])
            raise ValueError(f"optimizer.{knob}: applies only to name {where}; got name {name!r}")
        if knob in TWO_STEP_KNOBS:
            raise ValueError(
                f"optimizer.{knob}: does not apply to name 'sgd' (one pass, no ascent)"
            )
        if any(knob in ks for ks in BASE_KNOBS.values()):
            raise ValueError(
                f"optimizer.{knob}: not a knob of base {base!r}; allowed: "
                f"{', '.join(BASE_KNOBS[base])}"
            )
        raise ValueError(
            f"optimizer: unknown knob {knob!r}; allowed for name {name!r} and base {base!r}: "
            f"name, base, lr, rho, {', '.join(allowed)}"
        )

    return OptimizerSpec(
        name=name,
        base=base,
        lr=lr,
        rho=rho,
        table=_table(name, cfg),
        base_kwargs=_base_kwargs(base, cfg),
        ascent=_ascent(cfg),
        m=_m(cfg.get("m")),
        second_grad=_choice("second_grad", cfg.get("second_grad", "full"), SECOND_GRADS),
        stats=_boolean("stats", cfg.get("stats", True)),
        stats_every=_integer(
            "stats_every",
            cfg.get("stats_every", DEFAULT_STATS_EVERY),
            "an integer >= 1",
            lambda v: v >= 1,
        ),
        compile=_compile(cfg.get("compile", "auto")),
    )


def _table(name: str, cfg: dict[str, Any]) -> Table:
    if name in ("same", "custom_same"):
        scales = cfg.get("scales")
        what = "a list of 4 numbers [s1, s2, s3, s4] (d = (1 + s_k) g_p in region k)"
        if scales is None:
            raise ValueError(f"optimizer.scales: name {name!r} needs scales: {what}")
        if not isinstance(scales, (list, tuple)) or len(scales) != 4:
            raise _bad("scales", what, scales)
        s = [_number("scales", v, what) for v in scales]
        if name == "custom_same" and not (s[0] > 0 and s[1] == 0 and -1 <= s[2] < 0 and s[3] > 0):
            raise ValueError(
                "optimizer.scales: custom_same raises ckpt1, keeps ckpt2, lowers ckpt3, raises "
                f"ckpt4: allowed s1 > 0, s2 = 0, -1 <= s3 < 0, s4 > 0; got {list(scales)!r}"
            )
        return preset_table(name, scales=s)
    if name == "saner":
        if "alpha" not in cfg:
            raise ValueError("optimizer.alpha: name 'saner' needs alpha (the ckpt2 coefficient)")
        return preset_table(name, alpha=_number("alpha", cfg["alpha"], "a finite number"))
    if name == "sgd_on_region":
        region = cfg.get("region")
        if region is None:
            raise ValueError("optimizer.region: name 'sgd_on_region' needs region: 1, 2, 3 or 4")
        what = "one of 1, 2, 3, 4 (ckpt1..ckpt4)"
        return preset_table(name, region=_integer("region", region, what, lambda v: 1 <= v <= 4))
    if name == "table":
        if "coefficients" not in cfg:
            raise ValueError(
                "optimizer.coefficients: name 'table' needs coefficients: 4 rows [a_k, b_k]"
            )
        return check_table(cfg["coefficients"])
    return preset_table(name)


def _base_kwargs(base: str, cfg: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "weight_decay" in cfg:
        kw["weight_decay"] = _number(
            "weight_decay", cfg["weight_decay"], "a number >= 0", lambda v: v >= 0
        )
    if base == "sgd":
        if "momentum" in cfg:
            kw["momentum"] = _number("momentum", cfg["momentum"], "a number >= 0", lambda v: v >= 0)
        if "dampening" in cfg:
            kw["dampening"] = _number("dampening", cfg["dampening"], "a number")
        if "nesterov" in cfg:
            kw["nesterov"] = _boolean("nesterov", cfg["nesterov"])
            if kw["nesterov"] and (kw.get("momentum", 0.0) <= 0 or kw.get("dampening", 0.0) != 0):
                raise ValueError(
                    "optimizer.nesterov: needs momentum > 0 and dampening = 0 "
                    f"(got momentum={kw.get('momentum', 0.0)}, dampening={kw.get('dampening', 0.0)})"
                )
    else:
        if "betas" in cfg:
            betas = cfg["betas"]
            what = "two numbers [beta1, beta2] in [0, 1)"
            if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                raise _bad("betas", what, betas)
            kw["betas"] = tuple(_number("betas", b, what, lambda v: 0 <= v < 1) for b in betas)
        if "eps" in cfg:
            kw["eps"] = _number("eps", cfg["eps"], "a number > 0", lambda v: v > 0)
    return kw


def _ascent(cfg: dict[str, Any]) -> AscentConfig:
    kind = _choice("ascent", cfg.get("ascent", "sam"), ASCENTS)
    if "eta" in cfg and kind != "adaptive":
        raise ValueError(f"optimizer.eta: applies only to ascent 'adaptive'; got ascent {kind!r}")
    for knob in ("clamp_rms", "clamp_quantile", "clamp_renorm"):
        if knob in cfg and kind != "clamp":
            raise ValueError(f"optimizer.{knob}: applies only to ascent 'clamp'; got {kind!r}")
    if "clamp_rms" in cfg and "clamp_quantile" in cfg:
        raise ValueError(
            "optimizer.clamp_rms: give clamp_rms or clamp_quantile, not both "
            "(the clipping threshold is one or the other)"
        )
    eta = _number("eta", cfg.get("eta", 0.0), "a number >= 0", lambda v: v >= 0)
    rms = cfg.get("clamp_rms")
    quantile = cfg.get("clamp_quantile")
    if rms is not None:
        rms = _number("clamp_rms", rms, "a number > 0 (multiple of RMS(e))", lambda v: v > 0)
    if quantile is not None:
        quantile = _number(
            "clamp_quantile", quantile, "a number in (0, 1] (quantile of |e|)", lambda v: 0 < v <= 1
        )
    if kind == "clamp" and rms is None and quantile is None:
        rms = DEFAULT_CLAMP_RMS
    return AscentConfig(
        kind=kind,
        eta=eta,
        clamp_rms=rms,
        clamp_quantile=quantile,
        clamp_renorm=_boolean("clamp_renorm", cfg.get("clamp_renorm", False)),
    )


def _compile(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    allowed = ", ".join(str(m).lower() if isinstance(m, bool) else repr(m) for m in COMPILE_MODES)
    raise ValueError(f"optimizer.compile: expected one of {allowed}, got {value!r}")


def _m(value: Any) -> int | None:
    if value is None:
        return None
    return _integer("m", value, "null (whole batch) or an integer >= 1", lambda v: v >= 1)


def check_optimizer_config(mapping: Mapping[str, Any]) -> None:
    """Validate a whole ``optimizer:`` mapping without building anything (ValueError if bad)."""
    parse_optimizer_config(mapping)


def create_optimizer(
    params: Any,
    name: str = "sam",
    base: str = "sgd",
    lr: float = 0.05,
    rho: float = 0.05,
    **knobs: Any,
) -> SamOptimizer:
    """Build the optimizer of an ``optimizer:`` mapping over ``params``.

    ``params``: tensors, param-group dicts, or ``(name, tensor)`` pairs (``named_parameters()``;
    names label the per-tensor statistics). Use ``opt.train_step(model, loss_fn, x, y)`` for
    every preset; ``opt.two_step`` is False only for ``sgd``.
    """
    spec = parse_optimizer_config({"name": name, "base": base, "lr": lr, "rho": rho, **knobs})
    base_cls = torch.optim.SGD if spec.base == "sgd" else torch.optim.AdamW
    return SamOptimizer(
        params,
        base_cls,
        {"lr": spec.lr, **spec.base_kwargs},
        name=spec.name,
        table=spec.table,
        rho=spec.rho,
        ascent_cfg=spec.ascent,
        m=spec.m,
        second_grad=spec.second_grad,
        stats=spec.stats,
        stats_every=spec.stats_every,
        compile=spec.compile,
    )
