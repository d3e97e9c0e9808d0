"""The lab notes' verdicts, decided from data: which variant learns useful patterns, which fits
noise, in which stage of training.

Decision rule (one variant, one stage, against its reference variant, default SAM):

1. For train accuracy and test accuracy, take the stage value of each run (the metric's mean
   over the stage's epochs, see ``aggregate.stage_values``) and the difference variant minus
   reference with its 95% t interval (paired by seed when both ran the same seeds, else Welch).
2. Each difference is ``up`` (interval above 0), ``down`` (below 0) or ``flat`` (the interval
   spans 0 or cannot be computed, e.g. one seed). A difference smaller than ``min_effect``
   (default 0.005, half a point of accuracy) is ``flat`` even when its interval excludes 0:
   with two seeds a paired interval can be razor-thin around a negligible mean.
3. The verdict is read from this table (rows: train, columns: test):

   =========  =========================  =========================  =========================
   train      test up                    test flat                  test down
   =========  =========================  =========================  =========================
   up         learns useful patterns     noisy fitting              noisy fitting
   flat       learns useful patterns     no clear difference        noisy fitting
   down       learns useful patterns     learns useful patterns     underfitting
   =========  =========================  =========================  =========================

   The lab notes' two hypotheses: "noisy fitting" = train accuracy rises faster than the
   reference's while test accuracy does not (the generalisation gap widens; test falling at
   equal train accuracy widens it too); "learns useful patterns" = test accuracy rises, or
   train accuracy rises more slowly while test accuracy holds. Both falling is "underfitting";
   neither moving is "no clear difference".

Clean-train and noisy-train accuracy differences are reported beside the verdict (they tell
whether a train-accuracy gain came from the clean or the mislabelled examples) but do not enter
the rule, which stays the lab notes' own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from samstudy.analysis import comparisons
from samstudy.analysis.aggregate import (
    DEFAULT_REFERENCE,
    DEFAULT_STAGES,
    STAGE_METRICS,
    differences,
    stage_values,
)
from samstudy.analysis.load import Study

USEFUL = "learns useful patterns"
NOISY = "noisy fitting"
UNDERFIT = "underfitting"
NO_DIFF = "no clear difference"
VERDICTS: tuple[str, ...] = (USEFUL, NOISY, UNDERFIT, NO_DIFF)

# (train direction, test direction) -> verdict: the whole rule.
RULE: dict[tuple[str, str], str] = {
    ("up", "up"): USEFUL,
    ("up", "flat"): NOISY,
    ("up", "down"): NOISY,
    ("flat", "up"): USEFUL,
    ("flat", "flat"): NO_DIFF,
    ("flat", "down"): NOISY,
    ("down", "up"): USEFUL,
    ("down", "flat"): USEFUL,
    ("down", "down"): UNDERFIT,
}


DEFAULT_MIN_EFFECT = comparisons.DEFAULT_MIN_EFFECT
References = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]]


def verdict(train_direction: str, test_direction: str) -> str:
    """The verdict for one pair of directions (each ``up``, ``flat`` or ``down``)."""
    try:
        return RULE[(train_direction, test_direction)]
    except KeyError:
        raise ValueError(
            f"directions must be 'up', 'flat' or 'down', got {train_direction!r}, "
            f"{test_direction!r}"
        ) from None


def stage_differences(
    study: Study,
    reference: References = DEFAULT_REFERENCE,
    stages: Mapping[str, tuple[float, float]] | None = None,
    metrics: Sequence[str] = STAGE_METRICS,
    level: float = 0.95,
) -> pd.DataFrame:
    """Stage differences to the reference for each variant, stage and metric (tidy)."""
    per_run = stage_values(study, stages, metrics)
    return differences(per_run, study.variants, reference, ("stage", "metric"), level)


def verdict_table(
    study: Study,
    reference: References = DEFAULT_REFERENCE,
    stages: Mapping[str, tuple[float, float]] | None = None,
    level: float = 0.95,
    train_metric: str = "train_acc",
    test_metric: str = "test_acc",
    min_effect: float = DEFAULT_MIN_EFFECT,
    metrics: Sequence[str] = STAGE_METRICS,
) -> pd.DataFrame:
    """One row per variant, reference and stage: the differences, their directions, the verdict.

    ``reference`` is one reference or a list of them (``aggregate.reference_pairs``: a variant
    compared with several references has a row for each). A difference whose mean is below
    ``min_effect`` in absolute value counts as flat. ``metrics``: the stage metrics whose
    differences are shown beside the verdict (the rule reads only the train and test metric).

    Columns: ``variant, reference, stage, n, n_ref, paired`` (plus ``study`` and
    ``ref_study`` when several studies are loaded), then for each stage metric ``d_<metric>``
    (difference of means), ``d_<metric>_low`` / ``_high`` (interval), then ``train``, ``test``
    (directions) and ``verdict``. Variants without a reference (or without both train and
    test metric) are left out.
    """
    stage_order = list((DEFAULT_STAGES if stages is None else stages).keys())
    metrics = list(dict.fromkeys([train_metric, test_metric, *metrics]))
    diffs = stage_differences(study, reference, stages, metrics, level)
    rows = []
    groups = diffs.groupby(["variant", "reference", "stage"], sort=False, observed=True)
    for (variant, _, stage), group in groups:
        by_metric = group.set_index("metric")
        if train_metric not in by_metric.index or test_metric not in by_metric.index:
            continue
        train, test = (
            by_metric.at[m, "direction"] if abs(by_metric.at[m, "diff"]) >= min_effect else "flat"
            for m in (train_metric, test_metric)
        )
        first = by_metric.loc[test_metric]
        row = {
            "variant": variant,
            "reference": first["reference"],
            "stage": stage,
            "n": int(first["n"]),
            "n_ref": int(first["n_ref"]),
            "paired": bool(first["paired"]),
        }
        for metric in metrics:
            if metric in by_metric.index:
                row[f"d_{metric}"] = by_metric.at[metric, "diff"]
                row[f"d_{metric}_low"] = by_metric.at[metric, "ci_low"]
                row[f"d_{metric}_high"] = by_metric.at[metric, "ci_high"]
        row.update(train=train, test=test, verdict=verdict(train, test))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if study.runs["study"].nunique() > 1:
        study_of = dict(zip(study.variants["variant"], study.variants["study"], strict=True))
        table.insert(0, "study", table["variant"].map(study_of))
        table.insert(3, "ref_study", table["reference"].map(study_of))
    table["stage"] = pd.Categorical(table["stage"], categories=stage_order, ordered=True)
    table = table.sort_values(["variant", "reference", "stage"], kind="stable")
    table = table.reset_index(drop=True)
    table["stage"] = table["stage"].astype(str)
    return table


def hypothesis_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The notebook's hypothesis table: one row per variant, one column per stage, verdicts.

    The index is the variant; when some variant is compared with several references (a list
    of references), it is ``(variant, reference)``.
    """
    if verdicts.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(verdicts["stage"]))
    several = verdicts.groupby("variant")["reference"].nunique().max() > 1
    index = ["variant", "reference"] if several else "variant"
    table = verdicts.pivot(index=index, columns="stage", values="verdict")
    return table[order].rename_axis(columns=None)


# The notebook's own table (lab-notes.md, 2024/07/04): SAMECHECKPOINTk = SAM with the gradient
# of region k scaled up (g_p + g_p * mask_k), compared with SAM, early and late in training.
LAB_NOTES: dict[int, dict[str, str]] = {
    1: {"early": USEFUL, "late": USEFUL},
    2: {"early": NOISY, "late": USEFUL},
    3: {"early": USEFUL, "late": UNDERFIT},
    4: {"early": USEFUL, "late": USEFUL},
}


def lab_notes_region(name: Any, scales: Any) -> int | None:
    """k when a variant is the notebook's SAMECHECKPOINTk (``same`` raising one region only)."""
    if name != "same" or scales is None:
        return None
    try:
        values = json.loads(scales) if isinstance(scales, str) else list(scales)
    except (TypeError, ValueError):
        return None
    raised = [i for i, v in enumerate(values) if v != 0]
    if len(values) == 4 and len(raised) == 1 and values[raised[0]] > 0:
        return raised[0] + 1
    return None


def with_lab_notes(hypothesis: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """The hypothesis table plus the notebook's verdicts (``lab notes: <stage>``) where a
    variant is one of its SAMECHECKPOINTk runs, so data and notebook read side by side."""
    if hypothesis.empty or "params.optimizer.name" not in variants.columns:
        return hypothesis
    scales = variants.get("params.optimizer.scales", pd.Series(None, index=variants.index))
    region = {
        v: lab_notes_region(n, s)
        for v, n, s in zip(
            variants["variant"], variants["params.optimizer.name"], scales, strict=True
        )
    }
    out = hypothesis.copy()
    labels = list(out.index.get_level_values("variant"))
    if out.index.nlevels > 1:  # the notebook compared with SAM: not the rows against SGD
        name_of = dict(zip(variants["variant"], variants["params.optimizer.name"], strict=True))
        refs = out.index.get_level_values("reference")
        labels = [v if name_of.get(r) == "sam" else None for v, r in zip(labels, refs, strict=True)]
    for stage in [s for s in hypothesis.columns if s in {"early", "late"}]:
        out[f"lab notes: {stage}"] = [
            LAB_NOTES[region[v]][stage] if region.get(v) else "" for v in labels
        ]
    return out
