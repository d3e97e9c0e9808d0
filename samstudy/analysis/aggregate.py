"""Seed aggregation, final and best metrics, stage summaries and differences to a reference.

Every function takes and returns tidy frames. Intervals are two-sided Student t intervals at
``level`` (default 95%): mean +- t_{(1+level)/2, n-1} * std / sqrt(n), std with ddof=1, t from
``scipy.stats`` (``samstudy.analysis.stats``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from samstudy.analysis import comparisons
from samstudy.analysis.load import Study, plain
from samstudy.analysis.schema import PARAM_PREFIX
from samstudy.analysis.stats import ci_half_width, welch_interval
from samstudy.analysis.summary import run_values
from samstudy.optim.presets import fmt

STAGE_METRICS: tuple[str, ...] = comparisons.DEFAULT_METRICS
DEFAULT_STAGES = comparisons.DEFAULT_STAGES
DEFAULT_REFERENCE = "sam"


def seed_aggregate(
    frame: pd.DataFrame, by: Sequence[str], value: str = "value", level: float = 0.95
) -> pd.DataFrame:
    """Aggregate ``value`` over the rows of each ``by`` group (the seeds of a variant).

    Returns ``by`` + ``mean, std, n, ci_low, ci_high``; NaN values are left out (n counts the
    rest); with n < 2 std and the interval are NaN.
    """
    by = list(by)
    grouped = frame.groupby(by, sort=True, dropna=False, observed=True)[value]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    half = ci_half_width(out["std"].to_numpy(dtype=float), out["n"].to_numpy(), level)
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out


def curves(study: Study, metrics: Sequence[str] | None = None, level: float = 0.95) -> pd.DataFrame:
    """Learning curves per variant: ``variant, metric, step, mean, std, n, ci_low, ci_high``."""
    long = study.metrics
    if metrics is not None:
        long = long[long["metric"].isin(list(metrics))]
    return seed_aggregate(long, ["variant", "metric", "step"], level=level)


def final_and_best(study: Study, best_by: str = "test_acc", mode: str = "max") -> pd.DataFrame:
    """Per run: every metric at the last step (``final``) and at the early-stopping step.

    The early-stopping step is the first step where ``best_by`` is highest (``mode='max'``) or
    lowest (``'min'``): ``summary.run_values``, the export's own definition. Returns long rows
    ``run_id, variant, seed, kind, metric, value`` with kind ``final`` or ``best``, plus kind
    ``best`` / metric ``best_step`` for the step itself.
    """
    values = run_values(study.metrics[["run_id", "metric", "step", "value"]], best_by, mode)
    steps = values.best_step.rename("value").astype(float).reset_index()
    parts = [
        values.final.assign(kind="final"),
        values.best.assign(kind="best"),
        steps.assign(kind="best", metric="best_step"),
    ]
    per_run = pd.concat(
        [p.astype({"run_id": str, "metric": str}) for p in parts], ignore_index=True
    )
    per_run = per_run.merge(study.runs[["run_id", "variant", "seed"]], on="run_id", how="left")
    return per_run[["run_id", "variant", "seed", "kind", "metric", "value"]]


def final_best_table(
    study: Study,
    metrics: Sequence[str] = ("test_acc", "train_acc", "train_acc_noisy", "memorization"),
    best_by: str = "test_acc",
    mode: str = "max",
    level: float = 0.95,
) -> pd.DataFrame:
    """Seed-aggregated final and best (early-stopped) metrics.

    Returns ``variant, kind, metric, mean, std, n, ci_low, ci_high``.
    """
    per_run = final_and_best(study, best_by, mode)
    per_run = per_run[per_run["metric"].isin([*metrics, "best_step"])]
    return seed_aggregate(per_run, ["variant", "kind", "metric"], level=level)


def stage_values(
    study: Study,
    stages: Mapping[str, tuple[float, float]] | None = None,
    metrics: Sequence[str] = STAGE_METRICS,
) -> pd.DataFrame:
    """Per run, stage and metric: the mean of the metric over the stage's epochs.

    A stage ``(low, high)`` covers the steps s with ``low * E < s <= high * E``, E being the
    run's planned epochs (param ``epochs``, else its last logged step). A mean over the stage
    (not its end value) measures how fast a curve rises, which is what the lab notes compare.
    Returns ``run_id, variant, seed, stage, metric, value``.
    """
    stages = dict(DEFAULT_STAGES if stages is None else stages)
    for name, (low, high) in stages.items():
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"stage {name!r}: need 0 <= low < high <= 1, got ({low}, {high})")
    runs = study.runs
    if PARAM_PREFIX + "epochs" in runs.columns:
        planned = runs[PARAM_PREFIX + "epochs"].astype(float)
        planned = planned.fillna(runs["num_steps"].astype(float))
    else:
        planned = runs["num_steps"].astype(float)
    horizon = dict(zip(runs["run_id"], planned, strict=True))
    long = study.metrics[study.metrics["metric"].isin(list(metrics))]
    epochs = long["run_id"].map(horizon).to_numpy(dtype=float)
    step = long["step"].to_numpy(dtype=float)
    parts = []
    for name, (low, high) in stages.items():
        inside = (step > low * epochs) & (step <= high * epochs)
        part = long[inside].groupby(
            ["run_id", "variant", "seed", "metric"], dropna=False, observed=True
        )
        part = part["value"].mean().reset_index().assign(stage=name)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    return out[["run_id", "variant", "seed", "stage", "metric", "value"]]


def _settings(row: pd.Series) -> dict[str, Any]:
    """A variants-table row as dotted settings (params without the prefix, nulls left out)."""
    out = {}
    for col, value in row.items():
        if isinstance(col, str) and col.startswith(PARAM_PREFIX):
            value = plain(value)
            if value is not None:
                out[col[len(PARAM_PREFIX) :]] = value
    return out


def _as_references(
    reference: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
) -> list[str | Mapping[str, Any]]:
    if isinstance(reference, str | Mapping):
        return [reference]
    return list(reference)


def _one_reference(
    variants: pd.DataFrame, reference: str | Mapping[str, Any]
) -> dict[str, list[str]]:
    """Candidate references of each variant for one reference (see ``match_references``)."""
    labels = list(variants["variant"])
    if isinstance(reference, str) and reference in labels:
        return {v: [reference] for v in labels}
    spec = {"optimizer.name": reference} if isinstance(reference, str) else dict(reference)
    settings = {row["variant"]: _settings(row) for _, row in variants.iterrows()}
    found = comparisons.reference_candidates(settings, spec)
    if "study" not in variants.columns:
        return found
    # Several studies: a reference of the variant's own study first, another study's if none.
    study = dict(zip(variants["variant"], variants["study"].astype(str), strict=True))
    out = {}
    for label, candidates in found.items():
        own = [c for c in candidates if study[c] == study[label]]
        out[label] = own or candidates
    return out


def reference_pairs(
    variants: pd.DataFrame,
    reference: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] = DEFAULT_REFERENCE,
) -> list[tuple[str, str]]:
    """``(variant, its reference)`` for every comparison of every reference, each pair once.

    A variant that is a reference variant of one reference can be compared under another
    (SAM is the reference of J-SAM and is itself compared with SGD).
    """
    pairs: list[tuple[str, str]] = []
    for ref in _as_references(reference):
        for variant, candidates in _one_reference(variants, ref).items():
            if len(candidates) == 1 and candidates[0] != variant:
                if (variant, candidates[0]) not in pairs:
                    pairs.append((variant, candidates[0]))
    return pairs


def match_references(
    variants: pd.DataFrame, reference: str | Mapping[str, Any] = DEFAULT_REFERENCE
) -> dict[str, str | None]:
    """For each variant, the reference variant it is compared with (None: none or ambiguous).

    ``reference`` is a variant label (every variant is compared with that one), or a partial
    configuration (``{"optimizer.ascent": "sam"}``), or a bare string that is not a label, taken
    as ``optimizer.name``. With a partial configuration, a variant's reference is the reference
    variant that agrees with it on every other setting (``samstudy.analysis.comparisons``: a
    setting left out counts at its default; one that does not apply to the reference, such as
    SGD's rho, is not compared), so SAME at rho 0.1 is compared with SAM at rho 0.1. Several
    studies loaded together: a reference of the variant's own study when there is one.
    Reference variants map to themselves.
    """
    return {
        v: (c[0] if len(c) == 1 else None) for v, c in _one_reference(variants, reference).items()
    }


def differences(
    per_run: pd.DataFrame,
    variants: pd.DataFrame,
    reference: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] = DEFAULT_REFERENCE,
    keys: Sequence[str] = ("stage", "metric"),
    level: float = 0.95,
) -> pd.DataFrame:
    """Difference of each variant to its reference, per ``keys`` group, with a t interval.

    ``per_run`` has ``variant, seed, value`` and the ``keys`` columns (e.g. ``stage_values``).
    When both variants ran the same seeds (n >= 2) the difference is paired by seed (same
    initialisation and data order) and the interval is the t interval of the per-seed
    differences; otherwise Welch's interval. Returns ``variant, reference, *keys, diff,
    ci_low, ci_high, n, n_ref, paired, direction`` with direction ``up`` (interval above 0),
    ``down`` (below 0) or ``flat`` (the interval spans 0, or cannot be computed).
    """
    pairs = reference_pairs(variants, reference)
    keys = list(keys)
    values = per_run.dropna(subset=["value"])
    grouped = {
        k: g for k, g in values.groupby(["variant", *keys], sort=True, dropna=False, observed=True)
    }
    by_variant: dict[Any, list[tuple[Any, ...]]] = {}
    for variant, *key_values in grouped:
        by_variant.setdefault(variant, []).append(tuple(key_values))
    rows = []
    for variant, ref in pairs:
        for key_values in by_variant.get(variant, []):
            ref_group = grouped.get((ref, *key_values))
            if ref_group is None:
                continue
            rows.append(
                {
                    "variant": variant,
                    "reference": ref,
                    **dict(zip(keys, key_values, strict=True)),
                    **_difference(grouped[(variant, *key_values)], ref_group, level),
                }
            )
    columns = ["variant", "reference", *keys, "diff", "ci_low", "ci_high", "n", "n_ref"]
    return pd.DataFrame(rows, columns=[*columns, "paired", "direction"])


def _difference(group: pd.DataFrame, ref_group: pd.DataFrame, level: float) -> dict[str, Any]:
    """Variant minus reference over seeds: paired when both ran the same seeds, else Welch."""
    a = group.groupby("seed", dropna=False)["value"].mean()
    b = ref_group.groupby("seed", dropna=False)["value"].mean()
    paired = len(a) >= 2 and set(a.index) == set(b.index) and not pd.isna(list(a.index)).any()
    if paired:
        d = a - b.reindex(a.index)
        diff = float(d.mean())
        half = ci_half_width(float(d.std(ddof=1)), len(d), level)
        low, high = diff - half, diff + half
    else:
        diff, low, high = welch_interval(
            float(a.mean()),
            float(a.std(ddof=1)) if len(a) > 1 else math.nan,
            len(a),
            float(b.mean()),
            float(b.std(ddof=1)) if len(b) > 1 else math.nan,
            len(b),
            level,
        )
    return {
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        "n": len(a),
        "n_ref": len(b),
        "paired": paired,
        "direction": direction(low, high),
    }


def direction(low: float, high: float) -> str:
    """``up`` if the interval lies above 0, ``down`` if below, else ``flat`` (spans 0 or NaN)."""
    if low > 0:
        return "up"
    if high < 0:
        return "down"
    return "flat"


# Grid axes worth a heatmap first, when they vary.
PREFERRED_AXES: tuple[str, ...] = (
    "optimizer.rho",
    "optimizer.scales",
    "optimizer.name",
    "noise.rate",
    "model.name",
    "optimizer.alpha",
    "optimizer.lr",
)


def heatmap_pairs(study: Study, max_pairs: int = 3) -> list[tuple[str, str]]:
    """Pairs of grid axes (params that vary between variants) for heatmaps, preferred first."""
    axes = study.varying_params()
    ranked = [a for a in PREFERRED_AXES if a in axes] + sorted(
        a for a in axes if a not in PREFERRED_AXES
    )
    pairs = [(x, y) for i, x in enumerate(ranked) for y in ranked[i + 1 :]]
    return pairs[:max_pairs]


def grid_table(
    study: Study,
    x: str,
    y: str,
    metric: str = "test_acc",
    kind: str = "best",
    per_run: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Mean of a final/best metric over the runs at each (y, x) grid point (index y, columns x).

    The mean runs over seeds and over every other axis at that point; points no run reached
    are NaN. A param a variant does not define (e.g. ``optimizer.scales`` for SAM) shows as
    ``-``.
    """
    per_run = final_and_best(study) if per_run is None else per_run
    values = per_run[(per_run["kind"] == kind) & (per_run["metric"] == metric)]
    cols = [PARAM_PREFIX + x, PARAM_PREFIX + y]
    merged = values[["run_id", "value"]].merge(study.runs[["run_id", *cols]], on="run_id")
    for col in cols:
        merged[col] = _axis_values(merged[col])
    table = (
        merged.groupby([cols[1], cols[0]], sort=False, observed=True)["value"]
        .mean()
        .unstack(cols[0])
    )
    return table.reindex(
        index=_sorted_axis(table.index), columns=_sorted_axis(table.columns)
    ).rename_axis(index=y, columns=x)


def _axis_values(values: pd.Series) -> pd.Series:
    """Grid values as heatmap labels: ``-`` for undefined, lists as compact text ``[1,0,0,0]``."""

    def label(value: Any) -> Any:
        value = plain(value)
        if value is None:
            return "-"
        return fmt(value) if isinstance(value, list) else value

    return values.map(label).astype(object)


def _sorted_axis(values: Sequence[Any]) -> list[Any]:
    def key(v: Any) -> tuple[int, float, str]:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return (1, 0.0, str(v))
        return (0, float(v), "")

    return sorted(values, key=key)
