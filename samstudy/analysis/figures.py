"""The report's figures for what the lab notes reason about, each from the Parquet export alone,
with 95% seed bands:

* sharpness over epochs (where a study logs it);
* region shares (ckpt1..4) against rho at each stage (Project 2: "a higher perturbation radius
  increases ratio < 0");
* ||g_p|| / ||g|| per variant, early against late (God sign 2);
* region shares over epochs side by side for the SAM and the ASAM ascent (God sign 3);
* the Proposition 4.1 norms over epochs (activations and last-layer weights), one row per
  optimizer (SGD, SAM, J-SAM, logit-SAM, ...).

Each builder returns a :class:`Section`: a figure, or the one line that says why a study has
no data for it (a figure is never drawn empty).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from samstudy.analysis import aggregate, comparisons
from samstudy.analysis.load import Study, plain
from samstudy.analysis.plots import (
    NORM_METRICS,
    REGION_SHARES,
    SHARPNESS_METRICS,
    curves_figure,
    early_late_figure,
    family_curves_figure,
    side_by_side_figure,
    stage_param_figure,
)
from samstudy.analysis.schema import PARAM_PREFIX
from samstudy.optim.config import optimizer_label
from samstudy.optim.presets import fmt

RHO = "optimizer.rho"
ASCENT = "optimizer.ascent"


@dataclass
class Section:
    """One figure of the report (``figure`` None: left out, ``text`` says why)."""

    title: str
    name: str
    figure: Figure | None
    caption: str
    text: str


def settings_of(study: Study) -> dict[str, dict[str, Any]]:
    """Each variant's dotted settings (its params without the prefix, nulls left out)."""
    out = {}
    for _, row in study.variants.iterrows():
        out[row["variant"]] = {
            c[len(PARAM_PREFIX) :]: plain(v)
            for c, v in row.items()
            if c.startswith(PARAM_PREFIX) and plain(v) is not None
        }
    return out


def _outer_stages(stages: Mapping[str, tuple[float, float]]) -> list[str]:
    """``early`` and ``late`` when both are defined, else the first and the last stage."""
    names = list(stages)
    if "early" in names and "late" in names:
        return ["early", "late"]
    return list(dict.fromkeys([names[0], names[-1]]))


def _logged(study: Study, metrics: Sequence[str]) -> list[str]:
    have = set(study.metrics["metric"].astype(str).unique())
    return [m for m in metrics if m in have]


def sharpness_section(study: Study, curves: pd.DataFrame) -> Section:
    """Sharpness (top Hessian eigenvalue, trace) over the epochs where it was measured."""
    title = "Sharpness over epochs"
    metrics = _logged(study, SHARPNESS_METRICS)
    fig = (
        curves_figure(curves, metrics, "Sharpness (mean over seeds, 95% band)") if metrics else None
    )
    if fig is None:
        return Section(
            title, "", None, "", "Sharpness: not drawn, no run logged it (`sharpness.every` is 0)."
        )
    return Section(
        title,
        "sharpness.png",
        fig,
        "Sharpness at the epochs it was measured, per variant",
        "Measured every `sharpness.every` epochs on a fixed batch of training data.",
    )


def region_rho_table(
    study: Study, stages: Mapping[str, tuple[float, float]], level: float = 0.95
) -> pd.DataFrame:
    """Region shares per stage against rho: ``family, stage, metric, x, mean, ..., ci_high``.

    A *family* is a variant without its rho (``sam-mlp-n0.4``); only two-step variants, and
    only families run at two rhos or more, are kept.
    """
    settings = settings_of(study)
    study_of = dict(zip(study.variants["variant"], study.variants["study"], strict=True))
    rows = []
    for variant, s in settings.items():
        rho = s.get(RHO)
        if rho is None or RHO in comparisons.ignored_settings(s):
            continue
        rest = {k: v for k, v in s.items() if k != RHO}
        key = json.dumps([study_of[variant], rest], sort_keys=True, default=str)
        label = variant.replace(f"-rho{fmt(rho)}", "", 1)
        rows.append({"variant": variant, "key": key, "label": label, "x": float(rho)})
    families = pd.DataFrame(rows, columns=["variant", "key", "label", "x"])
    if families.empty:
        return pd.DataFrame()
    families = families[families.groupby("key")["x"].transform("nunique") >= 2]
    if families.empty:
        return pd.DataFrame()
    first_label = families.groupby("key")["label"].first()
    families["family"] = families["key"].map(first_label)
    per_run = aggregate.stage_values(study, stages, REGION_SHARES)
    per_run = per_run.merge(families[["variant", "family", "x"]], on="variant")
    per_run = per_run[per_run["stage"].isin(_outer_stages(stages))]
    return aggregate.seed_aggregate(per_run, ["family", "stage", "metric", "x"], level=level)


def region_rho_section(
    study: Study, stages: Mapping[str, tuple[float, float]], level: float = 0.95
) -> Section:
    """Project 2: region shares against rho at the early and the late stage."""
    title = "Region shares against rho"
    if not _logged(study, REGION_SHARES):
        return Section(
            title,
            "",
            None,
            "",
            "Region shares against rho: not drawn, no run logged region shares.",
        )
    table = region_rho_table(study, stages, level)
    if table.empty:
        return Section(
            title,
            "",
            None,
            "",
            "Region shares against rho: not drawn, no variant was run at two values of "
            "`optimizer.rho` with its other settings equal.",
        )
    outer = _outer_stages(stages)
    fig = stage_param_figure(table, "rho", REGION_SHARES, outer, "Region shares against rho")
    return Section(
        title,
        "regions-rho.png",
        fig,
        f"Share of coordinates per region against rho, stages {', '.join(outer)}",
        "Each point: the run's mean share over the stage's epochs, averaged over seeds "
        "(95% band). The lab notes (Project 2): a larger rho puts more coordinates in the "
        "regions with ratio < 0 (ckpt3, ckpt4).",
    )


def grad_ratio_section(
    study: Study, stages: Mapping[str, tuple[float, float]], level: float = 0.95
) -> Section:
    """God sign 2: ||g_p|| / ||g|| early against late, per variant."""
    title = "||g_p|| / ||g||, early against late"
    if not _logged(study, ["grad_ratio"]):
        return Section(
            title, "", None, "", "||g_p|| / ||g||: not drawn, no run logged `grad_ratio`."
        )
    outer = _outer_stages(stages)
    per_run = aggregate.stage_values(study, stages, ["grad_ratio"])
    per_run = per_run[per_run["stage"].isin(outer)]
    table = aggregate.seed_aggregate(per_run, ["variant", "stage"], level=level)
    fig = early_late_figure(table, outer, "||g_p|| / ||g|| (stage mean, 95% interval)")
    return Section(
        title,
        "grad-ratio.png",
        fig,
        f"||g_p|| / ||g|| per variant, stages {', '.join(outer)}",
        "God sign 2 of the lab notes: the perturbed gradient's norm over the clean one's is "
        "larger in the later stage.",
    )


def ascent_groups(study: Study) -> dict[str, list[str]]:
    """Variants with the SAM ascent and with the ASAM (``adaptive``) ascent, each SAM run only
    when an ASAM run has its other settings (all SAM runs when none does)."""
    settings = settings_of(study)
    ascent = {v: comparisons.setting(s, ASCENT) for v, s in settings.items()}
    asam = [v for v, a in ascent.items() if a == "adaptive"]
    sam = [v for v, a in ascent.items() if a == "sam"]
    if not asam or not sam:
        return {}
    reference = {ASCENT: "sam"}
    paired = {
        c[0]
        for v, c in comparisons.reference_candidates(settings, reference).items()
        if v in asam and len(c) == 1
    }
    return {"SAM ascent": sorted(paired) or sorted(sam), "ASAM ascent": sorted(asam)}


def ascent_section(study: Study, curves: pd.DataFrame) -> Section:
    """God sign 3: region shares over epochs, SAM's ascent beside ASAM's."""
    title = "Region shares over epochs: SAM and ASAM ascents"
    if not _logged(study, REGION_SHARES):
        return Section(
            title, "", None, "", "SAM against ASAM regions: not drawn, no run logged region shares."
        )
    groups = ascent_groups(study)
    if not groups:
        return Section(
            title,
            "",
            None,
            "",
            "SAM against ASAM regions: not drawn, the study has no pair of variants with "
            "`optimizer.ascent: sam` and `optimizer.ascent: adaptive`.",
        )
    fig = side_by_side_figure(curves, REGION_SHARES, groups, "Region shares: SAM and ASAM ascents")
    return Section(
        title,
        "regions-asam.png",
        fig,
        "Share of coordinates per region over epochs, SAM ascent (left) and ASAM (right)",
        "God sign 3 of the lab notes: ckpt3 and ckpt4 grow late while ckpt1 falls under SAM; "
        "under ASAM ckpt1 grows.",
    )


def optimizer_families(study: Study, variants: Sequence[str]) -> dict[str, list[str]]:
    """``variants`` grouped by their optimizer label (``sgd``, ``sam``, ``sam+jacobian+m1``)."""
    settings = settings_of(study)
    out: dict[str, list[str]] = {}
    for variant in sorted(variants):
        optimizer = {
            k[len("optimizer.") :]: v
            for k, v in settings.get(variant, {}).items()
            if k.startswith("optimizer.")
        }
        out.setdefault(optimizer_label(optimizer), []).append(variant)
    return dict(sorted(out.items()))


def norms_section(study: Study, level: float = 0.95) -> Section:
    """Proposition 4.1: activation and last-layer weight norms over epochs, per optimizer."""
    title = "Proposition 4.1: activation and last-layer norms"
    metrics = _logged(study, NORM_METRICS)
    if not metrics:
        return Section(
            title,
            "",
            None,
            "",
            "Proposition 4.1 norms: not drawn, no run logged `activation_norm` or "
            "`last_layer_norm` (the trainer logs them for models that declare a classifier).",
        )
    curves = aggregate.curves(study, metrics, level=level)
    families = optimizer_families(study, curves["variant"].unique())
    fig = family_curves_figure(curves, metrics, families, "Activation and last-layer norms")
    return Section(
        title,
        "norms.png",
        fig,
        "Mean L2 norm of the features on a fixed training batch and L2 norm of the last "
        "layer's weights over epochs, one row per optimizer (95% seed bands)",
        "Proposition 4.1 of the lab notes: on a 2-layer linear network J-SAM acts as SGD "
        "with an L2 penalty on the intermediate activations and the last layer's weights, so "
        "both norms should stay below SGD's and full SAM's.",
    )


def lab_notes_sections(
    study: Study, curves: pd.DataFrame, stages: Mapping[str, tuple[float, float]], level: float
) -> list[Section]:
    """Every lab-notes figure of the report, in order (``curves`` must hold the region and
    sharpness metrics)."""
    return [
        sharpness_section(study, curves),
        region_rho_section(study, stages, level),
        grad_ratio_section(study, stages, level),
        ascent_section(study, curves),
        norms_section(study, level),
    ]
