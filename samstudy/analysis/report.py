"""The study report: a self-contained HTML page and a markdown file, built from Parquet alone.

``build_report("quickstart")`` reads ``results/{runs,metrics}/study=quickstart`` and writes
``results/reports/quickstart/report.html`` (figures embedded as base64 PNG),
``report.md`` and the PNG files beside it. No MLflow is imported on this path. What it
compares (references, stages, verdict metrics, ``min_effect``) comes from the arguments, else
from the ``analysis:`` block of each study's file (``samstudy.analysis.comparisons``), else
the defaults. ``build_report(["a", "b"])`` (or ``"a,b"``) reports several studies together.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from samstudy.analysis import aggregate, comparisons, verdicts
from samstudy.analysis.comparisons import AnalysisSpec
from samstudy.analysis.document import Doc, final_best_display, verdict_display
from samstudy.analysis.figures import lab_notes_sections
from samstudy.analysis.load import Study, load_study
from samstudy.analysis.plots import (
    CURVE_METRICS,
    REGION_METRICS,
    SHARPNESS_METRICS,
    curves_figure,
    heatmap_figure,
    png_bytes,
)
from samstudy.analysis.schema import DEFAULT_ROOT, PARAM_PREFIX

References = str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]]


@dataclass
class ReportResult:
    """Where the report went, and the tables it shows."""

    out_dir: Path
    html: Path
    markdown: Path
    figures: list[Path]
    verdicts: pd.DataFrame
    hypothesis: pd.DataFrame
    final_best: pd.DataFrame


def _stages_text(stages: Mapping[str, tuple[float, float]]) -> str:
    return ", ".join(
        f"{name} = epochs in ({lo:.2f} E, {hi:.2f} E]" for name, (lo, hi) in stages.items()
    )


def study_names(studies: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` (or ``["a,b"]``) -> ``["a", "b"]``."""
    items = [studies] if isinstance(studies, str) else list(studies)
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def resolve_analysis(
    names: Sequence[str],
    analysis: AnalysisSpec | None = None,
    studies_dir: str | os.PathLike[str] | None = None,
) -> AnalysisSpec:
    """``analysis``, else the studies' own ``analysis:`` blocks combined
    (``comparisons.combine``), else the defaults."""
    if analysis is not None:
        return analysis
    return comparisons.combine([comparisons.study_analysis(n, studies_dir) for n in names])


def build_report(
    studies: str | Sequence[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    out_dir: str | os.PathLike[str] | None = None,
    reference: References | None = None,
    stages: Mapping[str, tuple[float, float]] | None = None,
    level: float = 0.95,
    best_by: str = "test_acc",
    max_heatmaps: int = 3,
    min_effect: float | None = None,
    descriptions: Mapping[str, str] | None = None,
    analysis: AnalysisSpec | None = None,
    studies_dir: str | os.PathLike[str] | None = None,
) -> ReportResult:
    """Build the report of one or several exported studies; returns the paths and tables.

    ``reference`` (one or a list: variant labels, optimizer names or partial configurations),
    ``stages`` and ``min_effect`` override the ``analysis`` block, which defaults to the study
    files' own (``<studies_dir>/NAME.yaml``; a study without a file gets the defaults).
    ``descriptions`` (study name -> its file's ``description``) are shown under the title.
    """
    names = study_names(studies)
    title_name = "+".join(names)
    plan = resolve_analysis(names, analysis, studies_dir)
    references: References = plan.references if reference is None else reference
    stages = dict(plan.stages if stages is None else stages)
    min_effect = plan.min_effect if min_effect is None else min_effect
    out = Path(out_dir) if out_dir is not None else Path(root) / "reports" / title_name
    out.mkdir(parents=True, exist_ok=True)
    study = load_study(names, root)
    if study.runs.empty:
        raise ValueError(
            f"no trials in the export of {title_name!r} under {root}: nothing to report"
        )

    doc = Doc()
    figures: dict[str, bytes] = {}
    doc.h(1, f"Study report: {title_name}")
    for name, text in (descriptions or {}).items():
        if text.strip():
            doc.p(f"{name}: {' '.join(text.split())}" if len(names) > 1 else " ".join(text.split()))
    n_variants = study.variants.shape[0]
    statuses = study.runs["status"].fillna("unknown").value_counts().sort_index()
    epochs = study.runs["num_steps"].dropna()
    doc.p(
        f"{len(study.runs)} trials in {n_variants} variants "
        f"({', '.join(f'{v} {k}' for k, v in statuses.items())}); "
        f"epochs logged: {int(epochs.min()) if len(epochs) else 0} to "
        f"{int(epochs.max()) if len(epochs) else 0}. Built "
        f"{dt.datetime.now().isoformat(timespec='seconds')} from the Parquet export under "
        f"`{root}`. Intervals are {level:.0%} Student t intervals over seeds."
    )

    # --- verdicts
    table = verdicts.verdict_table(
        study, references, stages, level, min_effect=min_effect, metrics=plan.metrics
    )
    hypothesis = verdicts.hypothesis_table(table)
    _verdict_section(doc, study, table, hypothesis, references, stages, min_effect)

    # --- shared settings (several studies)
    if len(names) > 1:
        _shared_section(doc, study, best_by, level)

    # --- final and best
    final_best = aggregate.final_best_table(
        study,
        metrics=("test_acc", "test_loss", "train_acc", "train_acc_noisy", "memorization"),
        best_by=best_by,
        level=level,
    )
    doc.h(2, "Final and best (early-stopped) accuracy")
    doc.p(
        f"Best = the epoch with the highest {best_by} of each run (early stopping on it); "
        "final = the last epoch. Mean over seeds [95% CI]."
    )
    doc.table(final_best_display(final_best, study))

    # --- curves
    curve_data = aggregate.curves(
        study, [*CURVE_METRICS, *REGION_METRICS, *SHARPNESS_METRICS], level=level
    )
    fig = curves_figure(curve_data, CURVE_METRICS, "Learning curves (mean over seeds, 95% band)")
    if fig is not None:
        figures["curves.png"] = png_bytes(fig)
        doc.h(2, "Learning curves")
        doc.figure(
            "curves.png",
            figures["curves.png"],
            "Train and test accuracy, test loss beside test accuracy, clean-train and "
            "noisy-train accuracy, memorisation, per variant",
        )
    fig = curves_figure(curve_data, REGION_METRICS, "Gradient regions and ||g_p||/||g||")
    if fig is not None:
        figures["regions.png"] = png_bytes(fig)
        doc.h(2, "Gradient regions over epochs")
        doc.figure(
            "regions.png",
            figures["regions.png"],
            "Share of coordinates per ratio region r = g_p / g, and ||g_p|| / ||g||",
        )

    # --- what the lab notes reason about
    skipped = []
    for section in lab_notes_sections(study, curve_data, stages, level):
        if section.figure is None:
            skipped.append(section.text)
            continue
        figures[section.name] = png_bytes(section.figure)
        doc.h(2, section.title)
        doc.p(section.text)
        doc.figure(section.name, figures[section.name], section.caption)
    if skipped:
        doc.h(2, "Figures without data in this study")
        for line in skipped:
            doc.p(line)

    # --- heatmaps
    pairs = aggregate.heatmap_pairs(study, max_pairs=max_heatmaps)
    per_run = aggregate.final_and_best(study, best_by=best_by)
    shown = False
    for x, y in pairs:
        grid = aggregate.grid_table(study, x, y, metric=best_by, kind="best", per_run=per_run)
        fig = heatmap_figure(grid, x, y, f"best {best_by}", f"best {best_by}: {y} x {x}")
        if fig is None:
            continue
        if not shown:
            doc.h(2, "Grid heatmaps")
            doc.p(
                f"Best {best_by} averaged over seeds and over the other grid axes at each point; "
                "'-' marks variants that do not define the param."
            )
            shown = True
        name = f"heatmap-{_slug(x)}-{_slug(y)}.png"
        figures[name] = png_bytes(fig)
        doc.figure(name, figures[name], f"best {best_by} over {y} x {x}")

    # --- variants
    doc.h(2, "Variants")
    axes = study.varying_params()
    cols = [
        "variant",
        *(["study"] if len(names) > 1 else []),
        "n_runs",
        *[PARAM_PREFIX + a for a in axes if PARAM_PREFIX + a in study.variants],
    ]
    doc.table(study.variants[cols].rename(columns=lambda c: c.removeprefix(PARAM_PREFIX)))

    for name, png in figures.items():
        (out / name).write_bytes(png)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    html_path.write_text(doc.html(f"samstudy report: {title_name}"), encoding="utf-8")
    return ReportResult(
        out_dir=out,
        html=html_path,
        markdown=md_path,
        figures=[out / n for n in figures],
        verdicts=table,
        hypothesis=hypothesis,
        final_best=final_best,
    )


def _verdict_section(
    doc: Doc,
    study: Study,
    table: pd.DataFrame,
    hypothesis: pd.DataFrame,
    references: References,
    stages: Mapping[str, tuple[float, float]],
    min_effect: float,
) -> None:
    doc.h(2, "Verdicts: which variant learns useful patterns, which fits noise")
    doc.p(
        f"Each variant against its reference ({_reference_text(references)}: the variant with "
        "these settings that agrees with it on every other setting), per stage "
        f"({_stages_text(stages)}, E = planned epochs). Stage value of a run: the mean of the "
        "metric over the stage's epochs. Δ = variant minus reference with its interval (paired "
        "by seed when both ran the same seeds, else Welch). A difference is up / down when its "
        "interval lies above / below 0 and its mean is at least "
        f"{min_effect:g} in size, flat otherwise. Verdict from (train, test): "
        "test up -> learns useful patterns; train up and test flat or down -> noisy fitting; "
        "train flat and test down -> noisy fitting; train down and test flat -> learns useful "
        "patterns; both down -> underfitting; both flat -> no clear difference. The other "
        "differences (clean and noisy train accuracy, test loss) are shown beside the verdict "
        "and do not enter it."
    )
    if hypothesis.empty:
        doc.p(
            "No verdicts: no variant has a reference to compare with (is there a variant "
            f"matching {_reference_text(references)} with the same other settings? A search "
            "study has one only when it samples one; `analysis.references` in the study file "
            "or `--reference KEY.PATH=VALUE` names another)."
        )
    else:
        doc.table(verdicts.with_lab_notes(hypothesis, study.variants).reset_index())
        doc.h(3, "Stage differences behind the verdicts")
        doc.table(verdict_display(table))
    paired = {v for pair in aggregate.reference_pairs(study.variants, references) for v in pair}
    unmatched = sorted(set(study.variants["variant"]) - paired)
    if unmatched:
        doc.p(
            f"Without a reference (none agrees with them on every other setting, or several "
            f"do): {', '.join(unmatched)}. `--reference LABEL` compares every variant with one "
            "variant instead."
        )


def _shared_section(doc: Doc, study: Study, best_by: str, level: float) -> None:
    """Variants run (with the same settings) in several of the studies, side by side."""
    shared = study.variants.groupby("variant_id")["study"].nunique()
    ids = set(shared[shared > 1].index)
    doc.h(2, "Variants shared by the studies")
    if not ids:
        doc.p("No variant was run with the same settings in more than one of these studies.")
        return
    final_best = aggregate.final_best_table(
        study, metrics=("test_acc", "test_loss", "memorization"), best_by=best_by, level=level
    )
    display = final_best_display(final_best, study)
    variants = study.variants[study.variants["variant_id"].isin(ids)]
    display = display[display["variant"].isin(set(variants["variant"]))].copy()
    setting = dict(zip(variants["variant"], variants["variant_id"], strict=True))
    display.insert(0, "settings", display["variant"].map(setting))
    display["variant"] = [v.split("/", 1)[-1] for v in display["variant"]]
    doc.p(
        "The same configuration (same `variant_id`: the trial config without seed and "
        "placement) in several studies, one row per study."
    )
    doc.table(display.sort_values(["settings", "study"]).drop(columns="settings"))


def _stages_text(stages: Mapping[str, tuple[float, float]]) -> str:
    return ", ".join(
        f"{name} = epochs in ({lo:.2f} E, {hi:.2f} E]" for name, (lo, hi) in stages.items()
    )


def _reference_text(references: References) -> str:
    items = [references] if isinstance(references, str | Mapping) else list(references)
    return "; ".join(f"`{comparisons.reference_text(r)}`" for r in items)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
