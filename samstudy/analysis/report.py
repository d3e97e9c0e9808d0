"""The study report: a self-contained HTML page and a markdown file, built from Parquet alone.

``build_report("quickstart")`` reads ``results/{runs,metrics}/study=quickstart`` and writes
``results/reports/quickstart/report.html`` (figures embedded as base64 PNG),
``report.md`` and the PNG files beside it. No MLflow is imported on this path.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from samstudy.analysis import aggregate, verdicts
from samstudy.analysis.load import Study, load_study
from samstudy.analysis.plots import (
    CURVE_METRICS,
    REGION_METRICS,
    curves_figure,
    heatmap_figure,
    png_bytes,
)
from samstudy.analysis.schema import DEFAULT_ROOT, PARAM_PREFIX
from samstudy.optim.presets import fmt


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


@dataclass
class _Doc:
    """Report content as blocks, rendered to both markdown and HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, name: str, png: bytes, caption: str) -> None:
        self.blocks.append(("figure", (name, png, caption)))

    def markdown(self) -> str:
        out = []
        for kind, content in self.blocks:
            if kind == "h":
                out.append("#" * content[0] + " " + content[1])
            elif kind == "p":
                out.append(content)
            elif kind == "table":
                out.append(_markdown_table(content))
            else:
                name, _, caption = content
                out.append(f"![{caption}]({name})\n\n*{caption}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = []
        for kind, content in self.blocks:
            if kind == "h":
                out.append(f"<h{content[0]}>{html.escape(content[1])}</h{content[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_html(content)}</p>")
            elif kind == "table":
                out.append(_html_table(content))
            else:
                name, png, caption = content
                data = base64.b64encode(png).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        body = "\n".join(out)
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}"
    "code{background:#f4f4f4;padding:0 3px}"
)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only markdown used in paragraphs)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):  # a list param (typed list<double>): [1,0,0,0]
        return fmt(list(value))
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(no rows)_"
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False, name=None):
        cells = [_cell(v).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>(no rows)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = [
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False, name=None)
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"

    def num(x: float) -> str:
        return f"{round(x, 3) + 0.0:{spec}}"  # + 0.0: no "-0.000" for a tiny negative

    if mean is None or math.isnan(mean):
        return ""
    if low is None or math.isnan(low) or math.isnan(high):
        return num(mean)
    return f"{num(mean)} [{num(low)}, {num(high)}]"


def verdict_display(table: pd.DataFrame) -> pd.DataFrame:
    """The verdict table with each difference written as ``+mean [low, high]``."""
    if table.empty:
        return table
    out = table[["variant", "stage", "reference"]].copy()
    out["seeds"] = [
        f"{n} vs {m}" + (" paired" if p else "")
        for n, m, p in zip(table["n"], table["n_ref"], table["paired"], strict=True)
    ]
    for metric in ("train_acc", "test_acc", "train_acc_clean", "train_acc_noisy"):
        col = f"d_{metric}"
        if col in table.columns:
            out[f"Δ {metric}"] = [
                _interval(m, lo, hi, signed=True)
                for m, lo, hi in zip(
                    table[col], table[col + "_low"], table[col + "_high"], strict=True
                )
            ]
    out["train"] = table["train"]
    out["test"] = table["test"]
    out["verdict"] = table["verdict"]
    return out


def final_best_display(final_best: pd.DataFrame, study: Study) -> pd.DataFrame:
    """One row per variant: final and best (early-stopped) metrics as ``mean [95% CI]``."""
    if final_best.empty:
        return pd.DataFrame()
    rows = []
    statuses = study.runs.groupby("variant")["status"].agg(
        lambda s: ", ".join(f"{k} {v}" for k, v in s.value_counts().sort_index().items())
    )
    for variant, group in final_best.groupby("variant", sort=True, observed=True):
        cells = {
            (k, m): (mean, lo, hi)
            for k, m, mean, lo, hi in group[
                ["kind", "metric", "mean", "ci_low", "ci_high"]
            ].itertuples(index=False, name=None)
        }
        n = int(group["n"].max())
        row = {"variant": variant, "runs": n, "status": statuses.get(variant, "")}
        for kind, metric, label in (
            ("best", "test_acc", "best test acc"),
            ("best", "best_step", "best epoch"),
            ("final", "test_acc", "final test acc"),
            ("final", "train_acc", "final train acc"),
            ("final", "train_acc_noisy", "final noisy-train acc"),
            ("final", "memorization", "final memorisation"),
        ):
            if (kind, metric) in cells:
                mean, lo, hi = cells[(kind, metric)]
                row[label] = f"{mean:.1f}" if metric == "best_step" else _interval(mean, lo, hi)
        rows.append(row)
    return pd.DataFrame(rows)


def _stages_text(stages: Mapping[str, tuple[float, float]]) -> str:
    return ", ".join(
        f"{name} = epochs in ({lo:.2f} E, {hi:.2f} E]" for name, (lo, hi) in stages.items()
    )


def build_report(
    studies: str | Sequence[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    out_dir: str | os.PathLike[str] | None = None,
    reference: str | Mapping[str, Any] = aggregate.DEFAULT_REFERENCE,
    stages: Mapping[str, tuple[float, float]] | None = None,
    level: float = 0.95,
    best_by: str = "test_acc",
    max_heatmaps: int = 3,
    min_effect: float = verdicts.DEFAULT_MIN_EFFECT,
    descriptions: Mapping[str, str] | None = None,
) -> ReportResult:
    """Build the report of one or several exported studies; returns the paths and tables.

    ``descriptions`` (study name -> its file's ``description``) are shown under the title.
    """
    names = [studies] if isinstance(studies, str) else list(studies)
    title_name = "+".join(names)
    out = Path(out_dir) if out_dir is not None else Path(root) / "reports" / title_name
    out.mkdir(parents=True, exist_ok=True)
    stages = dict(aggregate.DEFAULT_STAGES if stages is None else stages)
    study = load_study(names, root)
    if study.runs.empty:
        raise ValueError(
            f"no trials in the export of {title_name!r} under {root}: nothing to report"
        )

    doc = _Doc()
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
    table = verdicts.verdict_table(study, reference, stages, level, min_effect=min_effect)
    hypothesis = verdicts.hypothesis_table(table)
    doc.h(2, "Verdicts: which variant learns useful patterns, which fits noise")
    doc.p(
        f"Each variant against its reference ({_reference_text(reference)}), per stage "
        f"({_stages_text(stages)}, E = planned epochs). Stage value of a run: the mean of the "
        "metric over the stage's epochs. Δ = variant minus reference with its interval (paired "
        "by seed when both ran the same seeds, else Welch). A difference is up / down when its "
        "interval lies above / below 0 and its mean is at least "
        f"{min_effect:g} in size, flat otherwise. Verdict from (train, test): "
        "test up -> learns useful patterns; train up and test flat or down -> noisy fitting; "
        "train flat and test down -> noisy fitting; train down and test flat -> learns useful "
        "patterns; both down -> underfitting; both flat -> no clear difference."
    )
    if hypothesis.empty:
        doc.p(
            "No verdicts: no variant has a reference to compare with (is there a variant "
            f"matching {_reference_text(reference)} with the same other settings?)."
        )
    else:
        doc.table(verdicts.with_lab_notes(hypothesis, study.variants).reset_index())
        doc.h(3, "Stage differences behind the verdicts")
        doc.table(verdict_display(table))
    unmatched = sorted(
        v for v, r in aggregate.match_references(study.variants, reference).items() if r is None
    )
    if unmatched:
        doc.p(
            f"Without a reference (none agrees with them on every param both define, or several "
            f"do): {', '.join(unmatched)}. `--reference LABEL` compares every variant with one "
            "variant instead."
        )

    # --- final and best
    final_best = aggregate.final_best_table(study, best_by=best_by, level=level)
    doc.h(2, "Final and best (early-stopped) accuracy")
    doc.p(
        f"Best = the epoch with the highest {best_by} of each run (early stopping on it); "
        "final = the last epoch. Mean over seeds [95% CI]."
    )
    doc.table(final_best_display(final_best, study))

    # --- curves
    curve_data = aggregate.curves(study, [*CURVE_METRICS, *REGION_METRICS], level=level)
    fig = curves_figure(curve_data, CURVE_METRICS, "Learning curves (mean over seeds, 95% band)")
    if fig is not None:
        figures["curves.png"] = png_bytes(fig)
        doc.h(2, "Learning curves")
        doc.figure(
            "curves.png",
            figures["curves.png"],
            "Train, test, clean-train and noisy-train accuracy, memorisation, per variant",
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


def _reference_text(reference: str | Mapping[str, Any]) -> str:
    if isinstance(reference, str):
        return f"`{reference}`"
    return ", ".join(f"`{k}={v}`" for k, v in reference.items())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
