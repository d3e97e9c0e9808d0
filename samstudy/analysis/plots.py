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
    "test_loss",
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
REGION_SHARES: tuple[str, ...] = REGION_METRICS[:4]
SHARPNESS_METRICS: tuple[str, ...] = ("sharpness_lambda_max", "sharpness_trace")
NORM_METRICS: tuple[str, ...] = ("activation_norm", "last_layer_norm")
TITLES = {
    "test_loss": "test loss",
    "train_loss": "train loss (given labels)",
    "sharpness_lambda_max": "sharpness: top Hessian eigenvalue",
    "sharpness_trace": "sharpness: Hessian trace",
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
    "activation_norm": "mean ||features(x)|| (fixed batch)",
    "last_layer_norm": "||last layer's weights||",
    "weight_norm": "||all weights||",
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


def _band(ax, x, group: pd.DataFrame, color, label: str, share: bool) -> None:
    """A mean line with its interval band (clipped to [0, 1] for shares)."""
    ax.plot(x, group["mean"], color=color, lw=1.6, marker="o", ms=3, label=label)
    low, high = group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float)
    if share:
        low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=color, alpha=0.18, lw=0)


def _legend(fig: Figure, ax, n: int, title: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(max(n, 1), 3), fontsize=8)
    if title:
        fig.suptitle(title)
    rows = math.ceil(max(n, 1) / min(max(n, 1), 3))
    fig.tight_layout(rect=(0, min(0.5, 0.035 * rows + 0.03), 1, 0.95 if title else 1))


def stage_param_figure(
    table: pd.DataFrame, x: str, metrics: Sequence[str], stages: Sequence[str], title: str = ""
) -> Figure | None:
    """Stage values against a grid axis: one row per stage, one panel per metric, one line per
    ``family`` (seed mean and 95% band at each ``x``). ``table`` has ``family, stage, metric,
    x, mean, ci_low, ci_high``. None when there is nothing to draw."""
    if table.empty:
        return None
    families = sorted(table["family"].unique())
    colors = dict(zip(families, _colors(len(families)), strict=True))
    fig = Figure(figsize=(4.2 * len(metrics), 3.3 * len(stages) + 0.4 + 0.25 * len(families) / 3))
    axes = fig.subplots(len(stages), len(metrics), squeeze=False)
    xs = table["x"].to_numpy(float)
    logx = bool((xs > 0).all() and xs.max() / xs.min() >= 10)
    for row, stage in enumerate(stages):
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            data = table[(table["stage"] == stage) & (table["metric"] == metric)]
            for family, group in data.groupby("family", sort=True):
                group = group.sort_values("x")
                _band(ax, group["x"].to_numpy(float), group, colors[family], family, True)
            ax.set_title(f"{TITLES.get(metric, metric)}, {stage}", fontsize=9)
            ax.set_xlabel(x)
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
    _legend(fig, axes[0, 0], len(families), title)
    return fig


def early_late_figure(table: pd.DataFrame, stages: Sequence[str], label: str) -> Figure | None:
    """One row per variant: the stage values of one metric (seed mean, 95% interval as error
    bars), one marker per stage. ``table`` has ``variant, stage, mean, ci_low, ci_high``."""
    if table.empty:
        return None
    variants = sorted(table["variant"].unique(), reverse=True)
    fig = Figure(figsize=(8.0, 0.28 * len(variants) + 1.6))
    ax = fig.subplots()
    where = {v: i for i, v in enumerate(variants)}
    markers = ["o", "s", "^", "D"]
    for k, stage in enumerate(stages):
        data = table[table["stage"] == stage]
        y = data["variant"].map(where).to_numpy(float) + 0.15 * (k - (len(stages) - 1) / 2)
        mean = data["mean"].to_numpy(float)
        low = mean - data["ci_low"].to_numpy(float)
        high = data["ci_high"].to_numpy(float) - mean
        err = np.nan_to_num(np.vstack([low, high]), nan=0.0)
        ax.errorbar(mean, y, xerr=err, fmt=markers[k % 4], ms=4, capsize=2, label=stage)
    ax.set_yticks(range(len(variants)), variants, fontsize=7)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def side_by_side_figure(
    curves: pd.DataFrame, metrics: Sequence[str], groups: dict[str, list[str]], title: str = ""
) -> Figure | None:
    """Curves in columns, one column per group of variants (one row per metric), so the same
    metric reads across groups on one y scale. ``curves`` is ``aggregate.curves`` output."""
    present = [m for m in metrics if m in set(curves["metric"])]
    if not present or not groups:
        return None
    variants = sorted({v for members in groups.values() for v in members})
    colors = dict(zip(variants, _colors(len(variants)), strict=True))
    fig = Figure(figsize=(5.0 * len(groups), 2.8 * len(present) + 0.6 + 0.25 * len(variants) / 3))
    axes = fig.subplots(len(present), len(groups), squeeze=False, sharey="row")
    for row, metric in enumerate(present):
        for col, (name, members) in enumerate(groups.items()):
            ax = axes[row, col]
            data = curves[(curves["metric"] == metric) & curves["variant"].isin(members)]
            for variant, group in data.groupby("variant", sort=True, observed=True):
                group = group.sort_values("step")
                x = group["step"].to_numpy(float)
                _band(ax, x, group, colors[variant], variant, _is_share(metric))
            ax.set_title(f"{TITLES.get(metric, metric)}: {name}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8)
    if title:
        fig.suptitle(title)
    rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, min(0.5, 0.03 * rows + 0.03), 1, 0.95 if title else 1))
    return fig


def family_curves_figure(
    curves: pd.DataFrame, metrics: Sequence[str], families: dict[str, list[str]], title: str = ""
) -> Figure | None:
    """One row per family of variants, one column per metric (the column shares its y scale,
    so families compare by row); one line per variant with its 95% band."""
    present = [m for m in metrics if m in set(curves["metric"])]
    if not present or not families:
        return None
    fig = Figure(figsize=(5.0 * len(present), 2.7 * len(families) + 0.8))
    axes = fig.subplots(len(families), len(present), squeeze=False, sharey="col")
    for row, (family, members) in enumerate(families.items()):
        colors = dict(zip(sorted(members), _colors(len(members)), strict=True))
        for col, metric in enumerate(present):
            ax = axes[row, col]
            data = curves[(curves["metric"] == metric) & curves["variant"].isin(members)]
            for variant, group in data.groupby("variant", sort=True, observed=True):
                group = group.sort_values("step")
                _band(ax, group["step"].to_numpy(float), group, colors[variant], variant, False)
            ax.set_title(f"{family}: {TITLES.get(metric, metric)}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[row, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.8 if len(present) == 1 else 0.86, 0.97 if title else 1))
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
