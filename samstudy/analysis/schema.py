"""The Parquet layout of exported studies: paths, explicit pyarrow schemas, atomic partition writes.

Layout (Hive partitions, one folder per study, readable by pandas, DuckDB and Polars)::

    ROOT/runs/study=NAME/part-0.parquet      one row per trial
    ROOT/metrics/study=NAME/part-0.parquet   long: study, run_id, trial_id, step, metric,
                                             value, timestamp

This module imports no MLflow: the analysis and the report read through it offline.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from samstudy.paths import results_root

# Default results folder: <project root>/results (samstudy.paths), whatever the working directory.
DEFAULT_ROOT = results_root()
PART_FILE = "part-0.parquet"

# `study` is dictionary-encoded inside the files on purpose: pyarrow types a Hive partition key as
# dictionary<int32, string>, and a plain string column of the same name would make reading the
# whole root (`pd.read_parquet("results/metrics")`) fail with "Unable to merge".
STUDY_TYPE = pa.dictionary(pa.int32(), pa.string())
TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")

METRICS_SCHEMA = pa.schema(
    [
        pa.field("study", STUDY_TYPE, nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("timestamp", TIMESTAMP_TYPE),
    ]
)

# Fixed leading columns of the runs table; params, tags, final and best metrics follow.
RUNS_FIXED_FIELDS: list[pa.Field] = [
    pa.field("study", STUDY_TYPE, nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("variant", pa.string()),  # readable label of the config without the seed
    pa.field("variant_id", pa.string()),  # hash of the config without the seed
    pa.field("run_name", pa.string()),
    pa.field("status", pa.string()),  # samstudy.status tag, else derived from the MLflow status
    pa.field("error", pa.string()),  # a failed trial's "Type: message" (samstudy.error tag)
    pa.field("mlflow_status", pa.string()),
    pa.field("parent_run_id", pa.string()),
    pa.field("start_time", TIMESTAMP_TYPE),
    pa.field("end_time", TIMESTAMP_TYPE),
    pa.field("num_steps", pa.int64()),  # last logged step (= epochs trained)
    pa.field("best_step", pa.int64()),  # early-stopping epoch: argmax of the best-by metric
]
PARAM_PREFIX = "params."
TAG_PREFIX = "tags."
FINAL_PREFIX = "final."
BEST_PREFIX = "best."


def runs_schema(
    params: Mapping[str, pa.DataType] | Iterable[str],
    tag_keys: Iterable[str],
    metric_keys: Iterable[str],
) -> pa.Schema:
    """The runs table's schema for a study: fixed fields, then sorted params, tags, final, best.

    ``params`` maps each param to its type (``samstudy.analysis.params``); bare names are
    strings, as exports before typed params wrote them.
    """
    types = dict(params) if isinstance(params, Mapping) else dict.fromkeys(params, pa.string())
    metric_keys = sorted(set(metric_keys))
    fields = list(RUNS_FIXED_FIELDS)
    fields += [pa.field(PARAM_PREFIX + k, types[k]) for k in sorted(types)]
    fields += [pa.field(TAG_PREFIX + k, pa.string()) for k in sorted(set(tag_keys))]
    fields += [pa.field(FINAL_PREFIX + k, pa.float64()) for k in metric_keys]
    fields += [pa.field(BEST_PREFIX + k, pa.float64()) for k in metric_keys]
    return pa.schema(fields)


def partition_dir(root: str | os.PathLike[str], table: str, study: str) -> Path:
    """``ROOT/<table>/study=<study>``; the study name must be a plain folder name."""
    check_study_name(study)
    return Path(root) / table / f"study={study}"


def check_study_name(study: str) -> None:
    """Refuse names that would escape the partition folder or break Hive parsing."""
    bad = not study or study in {".", ".."} or any(c in study for c in "/\\=\0")
    if bad or study.startswith((".", "_")):
        raise ValueError(
            f"study name {study!r} cannot be a Parquet partition: use letters, digits, '-', "
            "'_' or '.', not starting with '.' or '_', without '/', '\\' or '='"
        )


def write_partitions(root: str | os.PathLike[str], study: str, tables: dict[str, pa.Table]) -> None:
    """Replace ``ROOT/<name>/study=<study>`` with each table, all written before any swap.

    Each table goes to a hidden temporary folder beside its partition (same file system, and
    hidden names are skipped by pyarrow's dataset discovery), then the old partition is renamed
    away and the new one renamed in: readers see either the old or the new folder, never a half
    written file, and re-exporting never leaves duplicate rows.
    """
    tag = uuid.uuid4().hex[:12]
    staged: list[tuple[Path, Path]] = []
    try:
        for name, table in tables.items():
            final = partition_dir(root, name, study)
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(final)
            tmp = final.parent / f".{final.name}.tmp-{tag}"
            tmp.mkdir()
            staged.append((tmp, final))
            pq.write_table(table, tmp / PART_FILE, compression="zstd")
        for tmp, final in staged:
            old = final.parent / f".{final.name}.old-{tag}"
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(final: Path) -> None:
    """Delete temporary folders left by an interrupted export of the same study."""
    pattern = re.compile(re.escape(f".{final.name}.") + r"(tmp|old)-[0-9a-f]{12}")
    for stale in final.parent.iterdir():
        if pattern.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def read_partition(
    root: str | os.PathLike[str],
    table: str,
    study: str,
    columns: list[str] | None = None,
    filters: list[tuple[str, str, Any]] | None = None,
    read_dictionary: list[str] | None = None,
) -> pa.Table:
    """Read one study's partition (every Parquet file in it) as one table.

    ``columns``, ``filters`` (pyarrow's, pushed down to the row groups) and ``read_dictionary``
    (string columns to read dictionary-encoded: pandas categoricals) are passed through.
    """
    folder = partition_dir(root, table, study)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no exported {table} for study {study!r} under {folder}: run "
            f"`python -m samstudy export {study}` (or `make export NAME={study}`) first"
        )
    parts = [
        pq.read_table(f, columns=columns, filters=filters, read_dictionary=read_dictionary)
        for f in files
    ]
    return pa.concat_tables(parts, promote_options="permissive")


def exported_studies(root: str | os.PathLike[str] = DEFAULT_ROOT) -> list[str]:
    """Names of the studies that have an exported runs partition under ``root``."""
    base = Path(root) / "runs"
    if not base.is_dir():
        return []
    return sorted(
        p.name.split("=", 1)[1]
        for p in base.iterdir()
        if p.is_dir() and p.name.startswith("study=") and any(p.glob("*.parquet"))
    )
