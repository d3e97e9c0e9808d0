"""The ``optimizer:`` mapping, typed: one pydantic model per registered preset, a union on ``name``.

Every model has the same three axes and base-optimizer fields (:class:`OptimizerBase`) plus its
preset's own knobs (``samstudy.optim.presets``). :data:`OptimizerConfig` is the discriminated
union that ``TrialConfig.optimizer`` and ``create_optimizer`` validate with; problems are
``ValueError`` / ``ValidationError`` naming the knob, the allowed values and bounds, with a
'did you mean' for misspelt names and knobs.

A validated config dumps as written: its name, base, lr and rho plus the knobs that were given
(``model_dump``). That dump is what trial ids hash, so the ids of studies started before the
config was typed do not change. Defaults live here and nowhere else: the field defaults below
(torch's own for the base optimizer), and :data:`RECIPE`, the lab's base-optimizer settings that
a trial config gets when it leaves them out. Only pydantic is imported (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from samstudy.configio import problems
from samstudy.configpath import closest, unknown_value_message
from samstudy.optim.presets import _SEALED, PRESETS, Knobs, Number, Preset, Table, fmt

BASES = ("sgd", "adamw")
ASCENTS = ("sam", "adaptive", "clamp")
SECOND_GRADS = ("full", "jacobian", "logit")
COMPILE_MODES = (True, False, "auto")
BASE_KNOBS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "weight_decay", "nesterov", "dampening"),
    "adamw": ("betas", "eps", "weight_decay"),
}
# Knobs of the ascent and second-gradient axes: a one-pass preset (sgd) has neither.
TWO_STEP_KNOBS = (
    "ascent",
    "eta",
    "clamp_rms",
    "clamp_quantile",
    "clamp_renorm",
    "m",
    "second_grad",
)
COMMON_KNOBS = ("name", "base", "lr", "rho", "stats", "stats_every", "compile")
DEFAULT_NAME = "sam"
DEFAULT_CLAMP_RMS = 3.0
# Statistics on every 32nd step, and always on the first after each read (so every epoch has
# one). Why this sparse: a measured step is about a dozen elementwise passes over all
# parameters (a rule's worth, which plain SAM does not otherwise need), and on a small model those
# passes are a large share of the step: on the digits MLP a measured step costs ~1/3 of a step, so
# measuring 6 of its 23 steps per epoch (every 4th) cost 9%, one in 23 about 1.5% (issue 14's
# target: <= 2%). The keys are means over the measured steps of a read period, each step
# covering every coordinate: a CIFAR epoch at batch 128 (391 steps) still averages 13 of them;
# a short epoch gets its first step. Set ``stats_every`` lower for denser sampling.
DEFAULT_STATS_EVERY = 32
# The lab's recipe for the base optimizer: what a trial config (not create_optimizer, which keeps
# torch's defaults) gets when it leaves these out, so ``{name: sgd}`` trains like the lab's runs.
RECIPE: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "weight_decay": 5e-4},
    "adamw": {"weight_decay": 5e-4},
}
# Always in a dump, set or not (the trial ids of earlier versions hashed them).
_DUMPED = ("name", "base", "lr", "rho")
# Knobs shown in a run name's optimizer label (the rest of a varied path is appended to the name).
LABELLED_KNOBS = ("name", "base", "rho", "ascent", "second_grad", "m")

Beta = Annotated[float, Field(strict=True, ge=0, lt=1)]


class OptimizerBase(BaseModel):
    """The fields every preset shares: base optimizer, ascent, second gradient, measurement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = DEFAULT_NAME
    base: Literal[BASES] = Field("sgd", description="the optimizer that takes d")  # type: ignore[valid-type]
    lr: Number = Field(0.05, ge=0)
    rho: Number = Field(0.05, ge=0, description="ascent radius; sgd ignores it")
    # base optimizer (None: torch's default)
    momentum: Number | None = Field(None, ge=0)
    dampening: Number | None = None
    nesterov: bool | None = Field(None, strict=True)
    weight_decay: Number | None = Field(None, ge=0)
    betas: tuple[Beta, Beta] | None = Field(None, description="[beta1, beta2] in [0, 1)")
    eps: Number | None = Field(None, gt=0)
    # ascent
    ascent: Literal[ASCENTS] = "sam"  # type: ignore[valid-type]
    eta: Number = Field(0.0, ge=0, description="ASAM's T_w = |w| + eta")
    clamp_rms: Number | None = Field(None, gt=0, description="tau = clamp_rms * RMS(e)")
    clamp_quantile: Number | None = Field(
        None, gt=0, le=1, description="tau = this quantile of |e|, in (0, 1]"
    )
    clamp_renorm: bool = Field(False, strict=True)
    m: int | None = Field(None, strict=True, ge=1, description="micro-batch size; null: the batch")
    # second gradient
    second_grad: Literal[SECOND_GRADS] = "full"  # type: ignore[valid-type]
    # measurement and kernels
    stats: bool = Field(True, strict=True)
    stats_every: int = Field(DEFAULT_STATS_EVERY, strict=True, ge=1)
    compile: bool | str = Field("auto", description="true, false or 'auto'")

    @property
    def preset(self) -> Preset:
        return PRESETS[self.name]

    @model_validator(mode="before")
    @classmethod
    def _knobs_apply(cls, data: Any) -> Any:
        """A knob that belongs to another preset, base or ascent: say which it belongs to."""
        if not isinstance(data, Mapping):
            return data
        preset = PRESETS[cls.model_fields["name"].default]
        base = data.get("base", "sgd")
        if not isinstance(base, str) or base not in BASES:
            return data  # the base itself is wrong: its own error says so, not its knobs'
        allowed = [*COMMON_KNOBS, *BASE_KNOBS[base], *preset.knob_names]
        if preset.two_step:
            allowed += TWO_STEP_KNOBS
        for knob in data:
            if knob in allowed:
                continue
            owners = [p.name for p in PRESETS.values() if knob in p.knob_names]
            if owners:
                raise ValueError(
                    f"{knob}: applies only to name {', '.join(owners)}; got name {preset.name!r}"
                )
            if knob in TWO_STEP_KNOBS:
                raise ValueError(
                    f"{knob}: does not apply to name {preset.name!r} (one pass, no ascent)"
                )
            if any(knob in ks for ks in BASE_KNOBS.values()):
                raise ValueError(
                    f"{knob}: not a knob of base {base!r}; allowed: {', '.join(BASE_KNOBS[base])}"
                )
            hint = closest(str(knob), allowed)
            raise ValueError(
                f"unknown knob {knob!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; allowed for name {preset.name!r} and base {base!r}: {', '.join(allowed)}"
            )
        return data

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"compile: expected one of true, false, 'auto', got {value!r}")

    @model_validator(mode="after")
    def _axes_agree(self) -> OptimizerBase:
        given = self.model_fields_set
        if "eta" in given and self.ascent != "adaptive":
            raise ValueError(f"eta: applies only to ascent 'adaptive'; got ascent {self.ascent!r}")
        for knob in ("clamp_rms", "clamp_quantile", "clamp_renorm"):
            if knob in given and self.ascent != "clamp":
                raise ValueError(f"{knob}: applies only to ascent 'clamp'; got {self.ascent!r}")
        if self.clamp_rms is not None and self.clamp_quantile is not None:
            raise ValueError(
                "clamp_rms: give clamp_rms or clamp_quantile, not both "
                "(the clipping threshold is one or the other)"
            )
        if self.nesterov:
            momentum, dampening = self.momentum or 0.0, self.dampening or 0.0
            if momentum <= 0 or dampening != 0:
                raise ValueError(
                    "nesterov: needs momentum > 0 and dampening = 0 "
                    f"(got momentum={momentum}, dampening={dampening})"
                )
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        keep = {*_DUMPED, *self.model_fields_set}
        return {key: value for key, value in data.items() if key in keep}

    # -- what the factory and run names need --------------------------------------------------

    @property
    def two_step(self) -> bool:
        return self.preset.two_step

    def region_table(self) -> Table:
        """The (a_k, b_k) rows for ckpt1..ckpt4."""
        return self.preset.table(self)

    def base_kwargs(self) -> dict[str, Any]:
        """The base optimizer's keyword arguments that were set (the rest: torch's defaults)."""
        return {k: getattr(self, k) for k in BASE_KNOBS[self.base] if getattr(self, k) is not None}

    def clamp_threshold(self) -> tuple[float | None, float | None]:
        """(clamp_rms, clamp_quantile) of the ``clamp`` ascent, with the default RMS multiple."""
        if self.ascent == "clamp" and self.clamp_rms is None and self.clamp_quantile is None:
            return DEFAULT_CLAMP_RMS, None
        return self.clamp_rms, self.clamp_quantile

    def label(self) -> str:
        """The optimizer part of a run name: ``same[2,0,0,0]``, ``sam+clamp``, ``sam/adamw``."""
        text = self.name + (self.preset.label(self) if self.preset.label else "")
        if self.ascent != "sam":
            text += f"+{self.ascent}"
        if self.second_grad != "full":
            text += f"+{self.second_grad}"
        if self.m is not None:
            text += f"+m{fmt(self.m)}"
        if self.base != "sgd":
            text += f"/{self.base}"
        return text


def _class_name(name: str) -> str:
    return "".join(part.title() for part in name.split("_")) + "Config"


def _member(preset: Preset) -> type[OptimizerBase]:
    bases = (OptimizerBase,) if preset.knobs is Knobs else (OptimizerBase, preset.knobs)
    return create_model(  # type: ignore[call-overload,no-any-return]
        _class_name(preset.name),
        __base__=bases,
        __module__=__name__,
        __doc__=f"optimizer ``{preset.name}``: {preset.summary}",
        name=(Literal[preset.name], preset.name),  # type: ignore[valid-type]
    )


MEMBERS: dict[str, type[OptimizerBase]] = {name: _member(p) for name, p in PRESETS.items()}
_SEALED.append(True)
# Module attributes, so that pickle (Ray ships study specs to its workers) finds each model by
# reference; pickled by value instead, a worker would hold a second, foreign class of it.
globals().update({cls.__name__: cls for cls in MEMBERS.values()})


def _named(data: Any) -> Any:
    """A mapping with a registered ``name`` (default ``sam``), before the union picks a member."""
    if isinstance(data, BaseModel):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a mapping of knobs (name, base, lr, rho, ...), got {data!r}")
    data = {"name": DEFAULT_NAME, **data}
    name = data["name"]
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"name: {unknown_value_message(name, PRESETS)}")
    return data


def with_recipe(data: Any) -> Any:
    """A trial's optimizer mapping with :data:`RECIPE`'s base knobs filled in where absent."""
    if not isinstance(data, Mapping):
        return data
    base = data.get("base", "sgd")
    return {**RECIPE.get(base, {}), **data} if isinstance(base, str) else data


OptimizerConfig = Annotated[
    Union[tuple(MEMBERS.values())],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="name"),
    BeforeValidator(_named),
]
_ADAPTER: TypeAdapter[OptimizerBase] = TypeAdapter(OptimizerConfig)


def parse_optimizer_config(mapping: Mapping[str, Any] | OptimizerBase) -> OptimizerBase:
    """Validate an ``optimizer:`` mapping; ``ValueError`` names every bad knob.

    Missing knobs take the field defaults (torch's own for the base optimizer, not the recipe).
    """
    if isinstance(mapping, OptimizerBase):
        return mapping
    try:
        return _ADAPTER.validate_python(mapping)
    except ValidationError as exc:
        raise ValueError("; ".join(problems(exc, OptimizerConfig, prefix="optimizer"))) from None


def check_optimizer_config(mapping: Mapping[str, Any]) -> None:
    """Validate a whole ``optimizer:`` mapping without building anything (ValueError if bad)."""
    parse_optimizer_config(mapping)


def preset_table(name: str, **knobs: Any) -> Table:
    """The (a_k, b_k) rows of preset ``name`` with ``knobs`` (ValueError if they do not fit)."""
    if name not in PRESETS:
        raise ValueError(f"optimizer.name: {unknown_value_message(name, PRESETS)}")
    return parse_optimizer_config({"name": name, **knobs}).region_table()


def optimizer_label(mapping: Mapping[str, Any]) -> str:
    """:meth:`OptimizerBase.label` of a dumped mapping; its bare name if it no longer validates
    (a run logged by an older version)."""
    try:
        return parse_optimizer_config(mapping).label()
    except ValueError:
        return str(mapping.get("name", DEFAULT_NAME))
