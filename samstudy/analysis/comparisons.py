"""The comparisons a study declares (its ``analysis:`` block) and how a reference picks each
variant's reference variant.

A **reference** is a partial configuration in dotted form, ``{optimizer.ascent: sam}``. A
variant *is* a reference variant when every setting of the reference has that value; a
variant's reference is the reference variant that agrees with it on every other setting.
A setting the trial config leaves out counts at its default (``optimizer.ascent`` of plain SAM
is ``sam``, ``optimizer.m`` is the whole batch), and a setting that does not apply to the
reference variant is not compared: SGD's ``rho`` (SGD ignores it), SAM's missing ``scales``,
the clamp threshold of an unclamped ascent. So ``{optimizer.name: sgd}`` pairs SAM at every rho
with the SGD run of the same model and noise, and ``{optimizer.ascent: sam}`` pairs each clamped
run with the unclamped run at the same rho. A reference value ``"*"`` takes any value and leaves
that setting uncompared: a search's sampled trials, each at its own rho, are compared with the
one reference point it evaluates (``optuna_same``).

This module imports neither pandas nor ``samstudy.study``: the study file's schema
(``samstudy.study.spec``) takes :class:`AnalysisSpec` from here and checks each reference
against the expanded trials with :func:`is_reference`; the report reads the block with
:func:`study_analysis` and pairs the exported variants with :func:`reference_candidates`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from samstudy.configio import ConfigError, parse_yaml, problems, read_yaml, report
from samstudy.configpath import closest
from samstudy.optim.config import parse_optimizer_config
from samstudy.optim.presets import PRESETS
from samstudy.train.config import COMPACT_DEFAULTS, EPOCH_METRICS

Reference = Mapping[str, Any]
# A reference value that matches any value (and so is not compared either): a search's
# reference point at any sampled rho is {optimizer.scales: [1, 1, 1, 1], optimizer.rho: "*"}.
ANY = "*"

DEFAULT_REFERENCES: tuple[dict[str, Any], ...] = ({"optimizer.name": "sam"},)
# (low, high] as fractions of a run's epochs: early = first third, late = last third.
DEFAULT_STAGES: dict[str, tuple[float, float]] = {"early": (0.0, 1 / 3), "late": (2 / 3, 1.0)}
# The verdict rule reads these two; the other metrics' differences are shown beside it.
VERDICT_INPUTS: tuple[str, str] = ("train_acc", "test_acc")
DEFAULT_METRICS: tuple[str, ...] = (
    "train_acc",
    "test_acc",
    "train_acc_clean",
    "train_acc_noisy",
    "test_loss",
)
# Smallest accuracy difference that can earn a verdict (half a percentage point).
DEFAULT_MIN_EFFECT = 0.005
OPTIMIZER_PREFIX = "optimizer."


class _Missing:
    """A setting a variant does not have (not logged, and no default that applies to it)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class AnalysisSpec(BaseModel):
    """The ``analysis:`` block of a study file: what the report compares, and how."""

    model_config = ConfigDict(extra="forbid")

    references: list[dict[str, Any]] = Field(
        default_factory=lambda: [dict(r) for r in DEFAULT_REFERENCES],
        description="partial configurations in dotted form, e.g. {optimizer.name: sam}",
    )
    stages: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(DEFAULT_STAGES),
        description="name -> [low, high], fractions of the epochs, 0 <= low < high <= 1",
    )
    metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        description="stage metrics of the verdict table; train_acc and test_acc decide",
    )
    min_effect: float = Field(
        DEFAULT_MIN_EFFECT, ge=0, description="smallest difference that counts as up or down"
    )

    @field_validator("references")
    @classmethod
    def _dotted(cls, references: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not references:
            raise ValueError("give at least one reference, e.g. {optimizer.name: sam}")
        for i, reference in enumerate(references):
            if not reference:
                raise ValueError(f"[{i}] is empty; name at least one setting")
            for key, value in reference.items():
                if not isinstance(key, str) or not key or key.startswith(".") or ".." in key:
                    raise ValueError(f"[{i}]: {key!r} is no dotted path (e.g. optimizer.ascent)")
                if isinstance(value, Mapping):
                    raise ValueError(
                        f"[{i}].{key}: write the reference in dotted form, "
                        f"e.g. {{{key}.{next(iter(value), 'name')}: ...}}, not a nested mapping"
                    )
        return references

    @field_validator("stages")
    @classmethod
    def _bounds(cls, stages: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        if not stages:
            raise ValueError("give at least one stage, e.g. {early: [0, 0.333]}")
        for name, (low, high) in stages.items():
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(f"{name}: need 0 <= low < high <= 1, got [{low}, {high}]")
        return stages

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics: list[str]) -> list[str]:
        for metric in metrics:
            if metric not in EPOCH_METRICS:
                hint = closest(metric, EPOCH_METRICS)
                raise ValueError(
                    f"unknown metric {metric!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed: {', '.join(EPOCH_METRICS)}"
                )
        missing = [m for m in VERDICT_INPUTS if m not in metrics]
        if missing:
            raise ValueError(
                f"must include {' and '.join(missing)} (the verdict rule reads train_acc and test_acc)"
            )
        return list(dict.fromkeys(metrics))


# -- settings of a variant ----------------------------------------------------------------------


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested trial config as dotted settings; lists stay lists (no JSON text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def _optimizer(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k[len(OPTIMIZER_PREFIX) :]: _plain(v)
        for k, v in settings.items()
        if k.startswith(OPTIMIZER_PREFIX)
        and "." not in k[len(OPTIMIZER_PREFIX) :]
        and v is not None
    }


@lru_cache(maxsize=4096)
def _knob_default(optimizer_json: str, knob: str) -> Any:
    """The value ``knob`` takes in this optimizer config when it is left out, or MISSING when
    the knob does not apply to it (another preset's knob, an ascent knob of a one-pass preset,
    a clamp knob of an unclamped ascent)."""
    optimizer = json.loads(optimizer_json)
    try:
        parsed = parse_optimizer_config(optimizer)
    except ValueError:
        return MISSING
    if knob not in type(parsed).model_fields:
        return MISSING
    default = getattr(parsed, knob)
    try:  # set explicitly, a knob that does not apply is refused by the optimizer's own checks
        parse_optimizer_config({**optimizer, knob: default})
    except ValueError:
        return MISSING
    return default


def setting(settings: Mapping[str, Any], key: str) -> Any:
    """The value of one dotted setting of a variant: as logged, else its default where the
    trial config leaves it out at its default (``COMPACT_DEFAULTS``) or the optimizer knob
    applies to the variant, else MISSING."""
    value = settings.get(key)
    if value is not None:
        return _plain(value)
    if key in COMPACT_DEFAULTS:  # left out of the logged config at its default
        return COMPACT_DEFAULTS[key]
    knob = key[len(OPTIMIZER_PREFIX) :] if key.startswith(OPTIMIZER_PREFIX) else ""
    if not knob or "." in knob:
        return MISSING
    optimizer = _optimizer(settings)
    return _knob_default(json.dumps(optimizer, sort_keys=True, default=str), knob)


def ignored_settings(settings: Mapping[str, Any]) -> set[str]:
    """Settings logged for a variant that cannot change its run: rho of a one-pass preset."""
    preset = PRESETS.get(str(settings.get(OPTIMIZER_PREFIX + "name")))
    return {OPTIMIZER_PREFIX + "rho"} if preset is not None and not preset.two_step else set()


def same_value(value: Any, wanted: Any) -> bool:
    """Numbers as numbers (``1`` is ``1.0``), lists by their items, booleans by their text
    (YAML ``true`` is JSON ``true``), anything else by its text (``"0.1"`` is ``0.1``)."""
    value, wanted = _plain(value), _plain(wanted)
    if value is MISSING or wanted is MISSING:
        return False
    if isinstance(value, list) and isinstance(wanted, list):
        return len(value) == len(wanted) and all(map(same_value, value, wanted))
    if isinstance(value, bool) or isinstance(wanted, bool):
        return str(value).lower() == str(wanted).lower()
    if isinstance(value, int | float) and isinstance(wanted, int | float):
        return value == wanted
    if value is None or wanted is None:
        return value is None and wanted is None
    return str(value) == str(wanted)


def matches(value: Any, wanted: Any) -> bool:
    """``same_value``, where a reference value ``"*"`` (:data:`ANY`) takes any value the
    variant has."""
    if isinstance(wanted, str) and wanted == ANY:
        return value is not MISSING
    return same_value(value, wanted)


def is_reference(settings: Mapping[str, Any], reference: Reference) -> bool:
    """Whether a variant (its dotted settings) has every setting the reference names."""
    return all(matches(setting(settings, k), v) for k, v in reference.items())


def agrees(variant: Mapping[str, Any], ref: Mapping[str, Any], reference: Reference) -> bool:
    """Whether ``ref`` is the same run as ``variant`` in every setting but the reference's own:
    settings either lacks, and those that do not apply to ``ref``, are not compared."""
    skip = set(reference) | ignored_settings(ref)
    for key in (set(variant) | set(ref)) - skip:
        a, b = setting(variant, key), setting(ref, key)
        if a is MISSING or b is MISSING:
            continue
        if not same_value(a, b):
            return False
    return True


def reference_candidates(
    variants: Mapping[str, Mapping[str, Any]], reference: Reference
) -> dict[str, list[str]]:
    """For each variant label, the reference variants it agrees with (a reference variant:
    itself only). ``variants`` maps labels to dotted settings."""
    refs = [v for v, s in variants.items() if is_reference(s, reference)]
    out: dict[str, list[str]] = {}
    for label, settings in variants.items():
        if label in refs:
            out[label] = [label]
        else:
            out[label] = [r for r in refs if agrees(settings, variants[r], reference)]
    return out


def reference_text(reference: Reference | str) -> str:
    """``optimizer.ascent=sam, optimizer.m=1`` (or the label / optimizer name as given)."""
    if isinstance(reference, str):
        return reference
    return ", ".join(
        f"{k}={json.dumps(_plain(v)) if not isinstance(v, str) else v}"
        for k, v in reference.items()
    )


def unmatched_reference(trials: Sequence[Mapping[str, Any]], reference: Reference) -> str | None:
    """Why no trial (dotted settings) matches ``reference``, or None when one does."""
    if any(is_reference(t, reference) for t in trials):
        return None
    parts = []
    for key, wanted in reference.items():
        values = {json.dumps(setting(t, key), default=repr) for t in trials}
        values.discard(json.dumps(MISSING, default=repr))
        if not values:
            known = sorted({k for t in trials for k in t})
            hint = closest(key, known)
            parts.append(f"no trial has {key}" + (f" (did you mean {hint!r}?)" if hint else ""))
        elif not any(matches(setting(t, key), wanted) for t in trials):
            parts.append(f"{key} takes {', '.join(sorted(values))} here")
    detail = "; ".join(parts) or "no single trial has all of these settings"
    return f"{{{reference_text(reference)}}} matches no trial of the study ({detail})"


def reference_problems(
    configs: Sequence[Mapping[str, Any]], references: Sequence[Reference]
) -> list[str]:
    """``analysis.references[i]: ...`` for each reference no trial config (nested) matches."""
    trials = [flat_settings(c) for c in configs]
    return [
        f"analysis.references[{i}]: {why}"
        for i, reference in enumerate(references)
        if (why := unmatched_reference(trials, reference)) is not None
    ]


# -- the command line and the study file ----------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets: ``a=1,b=[1,0]`` -> ``a=1``, ``b=[1,0]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_reference(text: str) -> Reference | str:
    """A ``--reference`` value: ``optimizer.ascent=sam[,KEY=VALUE...]`` (values read as YAML
    scalars: ``optimizer.scales=[1,0,0,0]``, ``optimizer.m=1``), else a variant label or an
    optimizer name as it is. ValueError for a malformed pair."""
    if "=" not in text:
        return text
    out: dict[str, Any] = {}
    for pair in _split_top(text):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key or " " in key:
            raise ValueError(f"--reference: {pair!r} is no KEY.PATH=VALUE pair")
        try:
            out[key] = parse_yaml(value.strip(), "--reference")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    AnalysisSpec(references=[out])  # the block's own checks
    return out


def read_analysis(path: str | Path) -> AnalysisSpec:
    """The ``analysis:`` block of a study file (defaults when it has none); ConfigError naming
    the file and the field when the block is malformed. The rest of the file is not checked."""
    data: Any = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (name:, base:, grid: ...)")
    block = data.get("analysis")
    if block is None:
        return AnalysisSpec()
    try:
        return AnalysisSpec.model_validate(block)
    except ValidationError as exc:
        raise ConfigError(report(path, problems(exc, AnalysisSpec, prefix="analysis"))) from None


def study_analysis(name: str, folder: str | Path | None = None) -> AnalysisSpec | None:
    """The analysis block of ``<folder>/NAME.yaml`` (``samstudy.settings.studies_dir``'s rule);
    None when there is no such file or the file has no block."""
    from samstudy.settings import studies_dir

    path = studies_dir(folder) / f"{name}.yaml"
    if not path.is_file():
        return None
    data: Any = read_yaml(path)
    if not isinstance(data, dict) or data.get("analysis") is None:
        return None
    return read_analysis(path)


def combine(analyses: Sequence[AnalysisSpec | None]) -> AnalysisSpec:
    """One analysis for several studies: every study's references (each once); stages,
    metrics and min_effect of the first study that declares a block."""
    given = [a for a in analyses if a is not None]
    if not given:
        return AnalysisSpec()
    references: list[dict[str, Any]] = []
    for analysis in given:
        for reference in analysis.references:
            if reference not in references:
                references.append(dict(reference))
    first = given[0]
    return AnalysisSpec(
        references=references,
        stages=first.stages,
        metrics=first.metrics,
        min_effect=first.min_effect,
    )
