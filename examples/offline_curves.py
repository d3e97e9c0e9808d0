"""Reproduce the report's test-accuracy learning curves from the Parquet export alone.

Needs only pandas and matplotlib (DuckDB is used when it is installed, pandas otherwise; SciPy's
t quantiles when it is installed, a printed table otherwise): no samstudy, no MLflow, so a
copied ``results/`` folder is enough. Runs are grouped by the export's ``variant`` column.

    python examples/offline_curves.py quickstart                      # -> quickstart-test_acc.png
    python examples/offline_curves.py quickstart --metric memorization --root results
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); larger df use the last.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t: SciPy's, else the table value for the largest
    tabulated df <= df (conservative in between)."""
    if df < 1:
        return math.nan
    try:
        from scipy.stats import t
    except ImportError:
        return T975[max(k for k in T975 if k <= df)]
    return float(t.ppf(0.975, df))


def per_run_values(root: Path, study: str, metric: str) -> pd.DataFrame:
    """run_id, variant, step, value for one metric (the latest value of a step logged twice)."""
    runs_glob = str(root / "runs" / f"study={study}" / "*.parquet")
    metrics_glob = str(root / "metrics" / f"study={study}" / "*.parquet")
    try:
        import duckdb
    except ImportError:
        duckdb = None
    if duckdb is not None:
        frame = duckdb.sql(
            f"""
            SELECT m.run_id, r.variant, m.step, arg_max(m.value, m.timestamp) AS value
            FROM read_parquet('{metrics_glob}') m
            JOIN read_parquet('{runs_glob}') r USING (run_id)
            WHERE m.metric = '{metric}'
            GROUP BY m.run_id, r.variant, m.step
            """
        ).df()
    else:
        metrics = pd.read_parquet(Path(metrics_glob).parent, filters=[("metric", "==", metric)])
        runs = pd.read_parquet(Path(runs_glob).parent, columns=["run_id", "variant"])
        metrics = metrics.sort_values("timestamp").drop_duplicates(["run_id", "step"], keep="last")
        frame = metrics.merge(runs, on="run_id")
    return frame[["run_id", "variant", "step", "value"]]


def curve_table(root: Path, study: str, metric: str) -> pd.DataFrame:
    """variant, step, mean, std, n, ci_low, ci_high: the seed aggregate the report plots."""
    values = per_run_values(root, study, metric)
    table = values.groupby(["variant", "step"])["value"].agg(["mean", "std", "count"])
    table = table.rename(columns={"count": "n"}).reset_index()
    half = [
        t975(n - 1) * s / math.sqrt(n) if n > 1 else math.nan
        for n, s in zip(table["n"], table["std"], strict=True)
    ]
    table["ci_low"] = table["mean"] - half
    table["ci_high"] = table["mean"] + half
    return table


def plot(table: pd.DataFrame, metric: str, out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for variant, group in table.groupby("variant"):
        line = ax.plot(group["step"], group["mean"], label=variant)[0]
        ax.fill_between(
            group["step"],
            group["ci_low"],
            group["ci_high"],
            alpha=0.2,
            color=line.get_color(),
            lw=0,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--root", type=Path, default=Path("results"))
    parser.add_argument("--metric", default="test_acc")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    table = curve_table(args.root, args.study, args.metric)
    if table.empty:
        print(f"no {args.metric!r} values for study {args.study!r} under {args.root}")
        return 1
    out = args.out or Path(f"{args.study}-{args.metric}.png")
    plot(table, args.metric, out)
    last = table.sort_values("step").groupby("variant").tail(1)
    print(last[["variant", "step", "mean", "ci_low", "ci_high", "n"]].to_string(index=False))
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
