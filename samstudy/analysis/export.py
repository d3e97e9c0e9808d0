"""MLflow -> Parquet export of one study (experiment = study name, one child run per trial).

``export_study`` reads the study in bulk (``samstudy.analysis.readers``), shapes it into the
runs table (one row per trial: variant, typed params, tags, final and best metrics) and the long
metrics table (every logged value), and replaces the study's two Parquet partitions atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from samstudy import tags
from samstudy.analysis.params import param_column, variant_from_params
from samstudy.analysis.readers import RawStudy, RunRecord, read_study
from samstudy.analysis.schema import (
    BEST_PREFIX,
    DEFAULT_ROOT,
    FINAL_PREFIX,
    METRICS_SCHEMA,
    PARAM_PREFIX,
    TAG_PREFIX,
    check_study_name,
    partition_dir,
    runs_schema,
    write_partitions,
)
from samstudy.analysis.summary import MODES, run_values

MLFLOW_TO_STATUS = {
    "FINISHED": "completed",
    "FAILED": "failed",
    "KILLED": "failed",
    "RUNNING": "running",
    "SCHEDULED": "running",
}


@dataclass
class ExportResult:
    """What ``export_study`` wrote, and how long it took."""

    study: str
    source: str
    n_runs: int
    n_metric_rows: int
    runs_path: Path
    metrics_path: Path
    read_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.read_s + self.write_s

    def summary(self) -> str:
        return (
            f"exported study {self.study!r} from {self.source}: {self.n_runs} trials, "
            f"{self.n_metric_rows} metric rows in {self.total_s:.2f} s "
            f"(read {self.read_s:.2f} s, write {self.write_s:.2f} s)\n"
            f"  {self.runs_path}\n  {self.metrics_path}"
        )


def select_trials(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The study's trial runs: tagged ``samstudy.role=trial``; untagged runs count too, unless
    they are some run's parent (so experiments logged by other tools still export). The parent
    run and the per-variant summary runs (``samstudy.role=variant``, ``samstudy summarize``)
    carry another role and are left out: they are not trials."""
    parents = {r.tags.get(tags.PARENT) for r in runs}
    chosen = []
    for run in runs:
        role = run.tags.get(tags.ROLE)
        if role == tags.ROLE_TRIAL or (role is None and run.run_id not in parents):
            chosen.append(run)
    return sorted(chosen, key=lambda r: r.run_id)


def run_variant(run: RunRecord) -> tuple[str, str]:
    """``(variant, variant_id)`` of a run: its tags, else (a run logged before the tags
    existed) what the expansion gives for its params and its overrides tag."""
    label, variant_id = run.tags.get(tags.VARIANT), run.tags.get(tags.VARIANT_ID)
    if label and variant_id:
        return label, variant_id
    return variant_from_params(run.params, run.tags.get(tags.OVERRIDES))


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode a string column: (int codes into the dictionary, the dictionary)."""
    combined = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = combined if pa.types.is_dictionary(combined.type) else pc.dictionary_encode(combined)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()  # code -1: null


def _trial_status(run: RunRecord) -> str | None:
    status = run.tags.get(tags.STATUS)
    if status:
        return status
    return MLFLOW_TO_STATUS.get(run.mlflow_status or "", run.mlflow_status)


def build_tables(
    raw: RawStudy, best_by: str = "test_acc", best_mode: str = "max"
) -> tuple[pa.Table, pa.Table]:
    """Shape a raw read into the runs table and the long metrics table (explicit schemas).

    The metrics table keeps every logged row (a resumed trial that logged an epoch twice keeps
    both, as MLflow does), sorted by run, metric, step and timestamp. The runs table's
    ``final.*``, ``best.*``, ``best_step`` and ``num_steps`` come from
    ``summary.run_values`` (latest value per step; early stopping on ``best_by``, ``best_mode``
    max or min); its params are typed by ``params.param_column``.
    """
    if best_mode not in MODES:
        raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}")
    trials = select_trials(raw.runs)
    trial_of = {r.run_id: r.tags.get(tags.TRIAL_ID) or r.run_id for r in trials}
    run_order = sorted(trial_of)  # run codes follow string order, so sorting codes sorts names
    code_of = {run_id: i for i, run_id in enumerate(run_order)}

    m = raw.metrics
    # Work on dictionary codes: turning millions of strings into Python objects is the slow part.
    run_index, run_dict = _encode(m["run_id"])
    # the appended -1 is what a null (code -1) and a run that is not a trial map to
    lut = np.asarray([code_of.get(r, -1) for r in run_dict] + [-1], dtype=np.int64)
    run_code = lut[run_index]
    keep = run_code >= 0
    run_code = run_code[keep]
    metric_index, metric_dict = _encode(m["metric"])
    metric_vocab = sorted(set(np.asarray(metric_dict, dtype=object)[np.unique(metric_index[keep])]))
    metric_lut = np.asarray(
        [metric_vocab.index(k) if k in metric_vocab else -1 for k in metric_dict]
    )
    metric_codes = metric_lut[metric_index[keep]] if keep.any() else np.zeros(0, dtype=np.int64)
    steps = m["step"].to_numpy()[keep]
    values = m["value"].to_numpy()[keep]
    stamps = m["timestamp"].to_numpy()[keep]
    order = np.lexsort((stamps, steps, metric_codes, run_code))
    run_code, metric_codes = run_code[order], metric_codes[order]
    steps, values, stamps = steps[order], values[order], stamps[order]

    n = len(order)
    codes = pa.array(run_code, pa.int64())
    metrics_table = pa.table(
        {
            "study": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, dtype=np.int32)), pa.array([raw.study])
            ),
            # take() builds the string columns in C++; object arrays of 4M strings would not
            "run_id": pc.take(pa.array(run_order, pa.string()), codes),
            "trial_id": pc.take(pa.array([trial_of[r] for r in run_order], pa.string()), codes),
            "step": pa.array(steps, pa.int64()),
            "metric": pc.take(pa.array(metric_vocab, pa.string()), pa.array(metric_codes)),
            "value": pa.array(values, pa.float64()),
            "timestamp": pa.array(stamps, pa.int64()).cast(METRICS_SCHEMA.field("timestamp").type),
        },
        schema=METRICS_SCHEMA,
    )

    long = pd.DataFrame(
        {
            "run": run_code,
            "metric": pd.Categorical.from_codes(metric_codes, metric_vocab),
            "step": steps,
            "value": values,
            "timestamp": stamps,
        }
    )
    summary = run_values(long, best_by, best_mode, run="run")
    n_runs = len(run_order)

    def matrix(frame: pd.DataFrame) -> np.ndarray:
        """run x metric values (NaN: not logged) in run_order x metric_vocab order."""
        wide = frame.assign(metric=frame["metric"].astype(str))
        wide = wide.pivot(index="run", columns="metric", values="value")
        return wide.reindex(index=range(n_runs), columns=metric_vocab).to_numpy(dtype=float)

    by_id = {r.run_id: r for r in trials}
    records = [by_id[run_id] for run_id in run_order]
    variants = [run_variant(r) for r in records]
    param_keys = sorted({k for r in trials for k in r.params})
    params = {k: param_column([r.params.get(k) for r in records]) for k in param_keys}
    tag_keys = sorted({k for r in trials for k in r.tags if not k.startswith("mlflow.")})
    schema = runs_schema({k: a.type for k, a in params.items()}, tag_keys, metric_vocab)
    columns: dict[str, Any] = {
        "study": [raw.study] * n_runs,
        "run_id": run_order,
        "trial_id": [trial_of[r] for r in run_order],
        "variant": [v[0] for v in variants],
        "variant_id": [v[1] for v in variants],
        "run_name": [r.run_name for r in records],
        "status": [_trial_status(r) for r in records],
        "error": [r.tags.get(tags.ERROR) for r in records],
        "mlflow_status": [r.mlflow_status for r in records],
        "parent_run_id": [r.tags.get(tags.PARENT) for r in records],
        "start_time": [r.start_time for r in records],
        "end_time": [r.end_time for r in records],
        "num_steps": summary.num_steps.reindex(range(n_runs)).astype("Int64"),
        "best_step": summary.best_step.reindex(range(n_runs)).astype("Int64"),
    }
    for k, array in params.items():
        columns[PARAM_PREFIX + k] = array
    for k in tag_keys:
        columns[TAG_PREFIX + k] = [r.tags.get(k) for r in records]
    final, best = matrix(summary.final), matrix(summary.best)
    for j, k in enumerate(metric_vocab):
        # NaN stays NaN (a diverged run's loss); a metric a run never logged is NaN as well
        columns[FINAL_PREFIX + k] = final[:, j]
        columns[BEST_PREFIX + k] = best[:, j]
    arrays = []
    for f in schema:
        column = columns[f.name]
        if isinstance(column, pa.Array):
            arrays.append(column)
        elif pa.types.is_timestamp(f.type):
            arrays.append(pa.array(column, pa.int64()).cast(f.type))
        else:
            arrays.append(pa.array(column, f.type, from_pandas=isinstance(column, pd.Series)))
    runs_table = pa.Table.from_arrays(arrays, schema=schema)
    return runs_table, metrics_table


def export_study(
    study: str,
    tracking_uri: str | None = None,
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    best_by: str = "test_acc",
    best_mode: str = "max",
    experiment: str | None = None,
) -> ExportResult:
    """Export one study from MLflow to ``ROOT/runs/study=NAME`` and ``ROOT/metrics/study=NAME``.

    ``experiment`` is the MLflow experiment holding the runs (default: the study name).
    Re-exporting replaces both partitions atomically (see ``write_partitions``), whatever
    version wrote them.
    """
    check_study_name(study)
    start = time.perf_counter()
    raw = read_study(study, tracking_uri, experiment)
    runs_table, metrics_table = build_tables(raw, best_by=best_by, best_mode=best_mode)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    write_partitions(root, study, {"runs": runs_table, "metrics": metrics_table})
    write_s = time.perf_counter() - start
    return ExportResult(
        study=study,
        source=raw.source,
        n_runs=runs_table.num_rows,
        n_metric_rows=metrics_table.num_rows,
        runs_path=partition_dir(root, "runs", study),
        metrics_path=partition_dir(root, "metrics", study),
        read_s=read_s,
        write_s=write_s,
    )
