"""Figures of the report (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CURVE_METRICS: tuple[str, ...] = (
    "train_acc",
    "test_acc",
    "train_acc_clean",
    "train_acc_noisy",
    "memorization",
)
REGION_METRICS: tuple[str, ...] = (
    "region_ckpt1",
    "region_ckpt2",
    "region_ckpt3",
    "region_ckpt4",
    "region_zero",
    "grad_ratio",
)
TITLES = {
    "train_acc": "train accuracy (given labels)",
    "test_acc": "test accuracy",
    "train_acc_clean": "train accuracy, clean examples",
    "train_acc_noisy": "train accuracy, mislabelled examples (given label)",
    "memorization": "memorisation (noisy examples fitted)",
    "region_ckpt1": "share in ckpt1 (r >= 1)",
    "region_ckpt2": "share in ckpt2 (0 < r < 1)",
    "region_ckpt3": "share in ckpt3 (r <= -1)",
    "region_ckpt4": "share in ckpt4 (-1 < r <= 0)",
    "region_zero": "share with g = 0",
    "grad_ratio": "||g_p|| / ||g||",
}


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


def _is_share(metric: str) -> bool:
    """Accuracies, memorisation/recovery and region shares live in [0, 1]."""
    return (
        metric.startswith("region_") or "_acc" in metric or metric in {"memorization", "recovery"}
    )


def curves_figure(
    curves: pd.DataFrame, metrics: Sequence[str], title: str = "", cols: int = 3
) -> Figure | None:
    """One panel per metric, one line per variant (seed mean) with its 95% interval band.

    ``curves`` is ``aggregate.curves`` output. Returns None when no metric has data.
    """
    present = [m for m in metrics if m in set(curves["metric"])]
    if not present:
        return None
    variants = sorted(curves["variant"].unique())
    colors = dict(zip(variants, _colors(len(variants)), strict=True))
    rows, ncols = _grid(len(present), cols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * rows + 0.6 + 0.22 * len(variants) / ncols))
    axes = fig.subplots(rows, ncols, squeeze=False)
    for ax, metric in zip(axes.flat, present, strict=False):
        data = curves[curves["metric"] == metric]
        for variant, group in data.groupby("variant", sort=True, observed=True):
            group = group.sort_values("step")
            x = group["step"].to_numpy(dtype=float)
            ax.plot(x, group["mean"], color=colors[variant], lw=1.6, label=variant)
            low, high = group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float)
            if _is_share(metric):  # with few seeds a t band overshoots what a share can be
                low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
            if np.isfinite(low).any():
                ax.fill_between(x, low, high, color=colors[variant], alpha=0.18, lw=0)
        ax.set_title(TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(variants), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    legend_rows = math.ceil(len(variants) / min(len(variants), 4))
    fig.tight_layout(rect=(0, min(0.45, 0.035 * legend_rows + 0.03), 1, 0.96 if title else 1))
    return fig


def heatmap_figure(
    table: pd.DataFrame, x_label: str, y_label: str, value_label: str, title: str = ""
) -> Figure | None:
    """A heatmap of ``table`` (index: y values, columns: x values) with the numbers written in."""
    if table.empty or not np.isfinite(table.to_numpy(dtype=float)).any():
        return None
    values = table.to_numpy(dtype=float)
    fig = Figure(figsize=(1.1 * values.shape[1] + 3.0, 0.6 * values.shape[0] + 2.2))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2.0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            color = "black" if v > middle else "white"
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, label=value_label)
    ax.set_title(title or value_label, fontsize=10)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
