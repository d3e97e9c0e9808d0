"""Report content as blocks, rendered to markdown and to self-contained HTML, and the tables
of the report written for reading (``mean [low, high]``)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from samstudy.analysis.load import Study
from samstudy.optim.presets import fmt


@dataclass
class Doc:
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
    """The verdict table with each difference written as ``+mean [low, high]``: the rule's
    train and test metric first, then the other metrics in the table's order."""
    if table.empty:
        return table
    lead = [c for c in ("study", "variant", "stage", "reference", "ref_study") if c in table]
    out = table[lead].copy()
    out["seeds"] = [
        f"{n} vs {m}" + (" paired" if p else "")
        for n, m, p in zip(table["n"], table["n_ref"], table["paired"], strict=True)
    ]
    metrics = [
        c[2:] for c in table.columns if c.startswith("d_") and not c.endswith(("_low", "_high"))
    ]
    for metric in metrics:
        col = f"d_{metric}"
        out[f"Δ {metric}"] = [
            _interval(m, lo, hi, signed=True)
            for m, lo, hi in zip(table[col], table[col + "_low"], table[col + "_high"], strict=True)
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
    study_of = dict(zip(study.variants["variant"], study.variants["study"], strict=True))
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
        if study.runs["study"].nunique() > 1:
            row = {"study": study_of.get(variant, ""), **row}
        for kind, metric, label in (
            ("best", "test_acc", "best test acc"),
            ("best", "best_step", "best epoch"),
            ("final", "test_acc", "final test acc"),
            ("final", "test_loss", "final test loss"),
            ("final", "train_acc", "final train acc"),
            ("final", "train_acc_noisy", "final noisy-train acc"),
            ("final", "memorization", "final memorisation"),
        ):
            if (kind, metric) in cells:
                mean, lo, hi = cells[(kind, metric)]
                row[label] = f"{mean:.1f}" if metric == "best_step" else _interval(mean, lo, hi)
        rows.append(row)
    return pd.DataFrame(rows)
