"""A lab-notes question answered in SQL over the Parquet export with DuckDB.

God sign 2 of the lab notes: "the gradient norm of the perturbed gradient over the current
gradient is greater at the later stage than at the earlier stage". For each variant: the mean
of ||g_p|| / ||g|| (metric ``grad_ratio``) over the first third of the epochs and over the last
third, and the late-minus-early difference with its 95% interval over seeds (paired: both
stages come from the same run). The stages are the report's: early = epochs in (0, E/3],
late = (2E/3, E], E = the run's planned epochs.

Needs DuckDB and pandas (SciPy's t quantiles when it is installed, a printed table otherwise):
no samstudy, no MLflow, so a copied ``results/`` folder is enough.

    python examples/duckdb_grad_ratio.py quickstart --root results
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import duckdb
import pandas as pd

# Two-sided 95% Student t quantiles by degrees of freedom; larger df use the last one below.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}  # fmt: skip

QUESTION = """
WITH runs AS (
    SELECT run_id, variant, "params.epochs" AS epochs
    FROM read_parquet('{runs}')
),
ratio AS (  -- the latest value of each epoch: a resumed trial may log an epoch twice
    SELECT run_id, step, arg_max(value, timestamp) AS value
    FROM read_parquet('{metrics}')
    WHERE metric = 'grad_ratio'
    GROUP BY run_id, step
),
per_run AS (
    SELECT r.variant,
           avg(v.value) FILTER (WHERE v.step > 0 AND v.step <= r.epochs * (1.0 / 3)) AS early,
           avg(v.value) FILTER (WHERE v.step > r.epochs * (2.0 / 3) AND v.step <= r.epochs) AS late
    FROM ratio v JOIN runs r USING (run_id)
    GROUP BY r.run_id, r.variant
)
SELECT variant,
       count(*) AS n,
       avg(early) AS early,
       avg(late) AS late,
       avg(late - early) AS diff,
       avg(late - early) - t975(count(*) - 1) * stddev_samp(late - early) / sqrt(count(*))
           AS ci_low,
       avg(late - early) + t975(count(*) - 1) * stddev_samp(late - early) / sqrt(count(*))
           AS ci_high
FROM per_run
WHERE early IS NOT NULL AND late IS NOT NULL
GROUP BY variant
ORDER BY variant
"""


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (SciPy's, else the table's for the largest df <= df)."""
    if df is None or df < 1:
        return math.nan
    try:
        from scipy.stats import t
    except ImportError:
        return T975[max(k for k in T975 if k <= df)]
    return float(t.ppf(0.975, df))


def grad_ratio_table(root: Path, study: str) -> pd.DataFrame:
    """variant, n, early, late, diff, ci_low, ci_high (the answer, one row per variant)."""
    con = duckdb.connect()
    con.create_function("t975", t975, ["BIGINT"], "DOUBLE", null_handling="special")
    quote = lambda p: str(p).replace("'", "''")  # noqa: E731 - a path inside a SQL string
    sql = QUESTION.format(
        runs=quote(root / "runs" / f"study={study}" / "*.parquet"),
        metrics=quote(root / "metrics" / f"study={study}" / "*.parquet"),
    )
    return con.sql(sql).df()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--root", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    table = grad_ratio_table(args.root, args.study)
    if table.empty:
        print(f"no grad_ratio values for study {args.study!r} under {args.root}")
        return 1
    table["later is larger"] = table["ci_low"] > 0
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
