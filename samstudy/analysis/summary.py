"""Final, best and latest-per-step values of runs: one definition for the export and the analysis.

* **latest per step**: a step logged twice (a resumed trial) counts with its latest value;
* **final** ``M``: M at the last step M was logged (NaN stays NaN: a diverged run's loss);
* **best step**: the first step where the ``best_by`` metric is highest (``mode='max'``) or
  lowest (``'min'``), NaN values left out: early stopping on that metric; **best** ``M``: M at
  that step;
* **num_steps**: the run's last logged step over all metrics.

The export fills the runs table's ``final.*``, ``best.*``, ``best_step`` and ``num_steps`` with
:func:`run_values`; ``aggregate.final_and_best`` calls it on the loaded study, so both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

MODES = ("max", "min")


def latest_per_step(long: pd.DataFrame, run: str = "run_id") -> pd.DataFrame:
    """Rows of ``long`` (``run, metric, step, value, timestamp``) with one row per
    (run, metric, step): the one with the latest timestamp (the later row on a tie)."""
    key = [run, "metric", "step"]
    dup = long.duplicated(key, keep=False).to_numpy()
    if not dup.any():
        return long
    # Rare (a resumed trial): only the duplicated rows need sorting by time.
    latest = long[dup].sort_values("timestamp", kind="stable").drop_duplicates(key, keep="last")
    return long[~dup | long.index.isin(latest.index)]


@dataclass
class RunValues:
    """Per-run values of a long metrics frame (``run`` is the run column's name)."""

    final: pd.DataFrame  # run, metric, value: at the metric's last step
    best: pd.DataFrame  # run, metric, value: at the run's best step
    best_step: pd.Series  # run -> first step with the best value of best_by
    num_steps: pd.Series  # run -> last logged step


def run_values(
    long: pd.DataFrame, best_by: str = "test_acc", mode: str = "max", run: str = "run_id"
) -> RunValues:
    """Final and best values of every run and metric in ``long`` (``run, metric, step,
    value``, plus ``timestamp`` when a step may have been logged twice).

    Rows need a unique index; their order does not matter.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    if "timestamp" in long.columns:
        long = latest_per_step(long, run)
    by_metric = long.groupby([run, "metric"], sort=False, observed=True)["step"]
    final = long.loc[by_metric.idxmax(), [run, "metric", "value"]] if len(long) else long
    num_steps = long.groupby(run, sort=False, observed=True)["step"].max()
    scored = long[(long["metric"] == best_by) & long["value"].notna()]
    # idxmax / idxmin give the first row of the best value: in step order, the first best step.
    scored = scored.sort_values([run, "step"], kind="stable")
    grouped = scored.groupby(run, sort=False, observed=True)["value"]
    first_best = grouped.idxmax() if mode == "max" else grouped.idxmin()
    best_step = scored.loc[first_best.to_numpy(), [run, "step"]]
    best = long.merge(best_step, on=[run, "step"], how="inner")[[run, "metric", "value"]]
    return RunValues(
        final=final[[run, "metric", "value"]].reset_index(drop=True),
        best=best.reset_index(drop=True),
        best_step=best_step.set_index(run)["step"],
        num_steps=num_steps,
    )
