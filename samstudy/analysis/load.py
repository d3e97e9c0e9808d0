"""Load exported studies from Parquet into tidy pandas frames, grouped by variant.

A *variant* is a trial config without its seed (and without the fields that only say where or
how fast a trial ran, ``samstudy.identity.PLACEMENT_PATHS``): the runs of one variant differ
only in their seed. The expansion decides it once for every trial (``variant_id``, a hash, and
``variant``, the run name without the seed, e.g. ``same[2,0,0,0]-rho0.1-mlp-n0.4``); the export
writes both as columns and the analysis groups by ``(study, variant_id)``. Labels that would
collide (runs logged by other tools) get the differing params appended; several studies loaded
together prefix theirs with ``study/``.

An export of an earlier version (string params, no variant columns) loads too: its params are
typed by the export's rule and its variants derived as the export derives them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from samstudy import tags
from samstudy.analysis import summary
from samstudy.analysis.params import (
    arrow_to_pandas,
    retype_string_params,
    unify_params,
    variant_from_params,
)
from samstudy.analysis.schema import DEFAULT_ROOT, PARAM_PREFIX, TAG_PREFIX, read_partition
from samstudy.identity import PLACEMENT_PATHS, SEED_PATH
from samstudy.optim.presets import fmt
from samstudy.train.config import COMPACT_DEFAULTS

SEED_PARAMS: tuple[str, ...] = (SEED_PATH,)
# Params that say where or how fast a trial ran, not what it computed: not shown as a variant's.
IGNORED_PARAMS: tuple[str, ...] = PLACEMENT_PATHS
VARIANT_KEY = ["study", "variant_id"]


@dataclass
class Study:
    """One or several exported studies as tidy frames.

    ``runs``: one row per trial (``run_id``, ``trial_id``, ``study``, ``status``, typed
    ``params.*``, ``final.*``, ``best.*``, plus ``variant``, ``variant_id``, ``seed``).
    ``metrics``: long, one row per (run, metric, step), the latest value when a step was logged
    twice: ``study, run_id, variant, seed, step, metric, value``.
    ``variants``: one row per variant: ``variant``, ``variant_id``, ``study``, ``n_runs`` and
    the params that define it.
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    variants: pd.DataFrame

    @property
    def names(self) -> list[str]:
        return sorted(self.runs["study"].astype(str).unique())

    def varying_params(self) -> list[str]:
        """Param columns (without the prefix) that take more than one value across variants."""
        return varying_params(self.variants)


def _as_list(studies: str | Iterable[str]) -> list[str]:
    return [studies] if isinstance(studies, str) else list(studies)


def plain(value: Any) -> Any:
    """JSON-able value (pandas NA -> None, numpy -> Python, tuples -> lists)."""
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _with_variants(table: pa.Table) -> pa.Table:
    """Add ``variant`` / ``variant_id`` to a runs table exported before they existed (its params
    are still MLflow's strings), placed after ``trial_id`` as now."""
    params = [c for c in table.column_names if c.startswith(PARAM_PREFIX)]
    overrides_col = TAG_PREFIX + tags.OVERRIDES
    overrides = (
        table.column(overrides_col).to_pylist()
        if overrides_col in table.column_names
        else [None] * table.num_rows
    )
    found = [
        variant_from_params(
            {k[len(PARAM_PREFIX) :]: v for k, v in row.items() if v is not None}, text
        )
        for row, text in zip(table.select(params).to_pylist(), overrides, strict=True)
    ]
    at = table.column_names.index("trial_id") + 1
    table = table.add_column(at, "variant", pa.array([f[0] for f in found], pa.string()))
    return table.add_column(at + 1, "variant_id", pa.array([f[1] for f in found], pa.string()))


def read_runs_table(name: str, root: str | os.PathLike[str] = DEFAULT_ROOT) -> pa.Table:
    """One study's runs partition with typed params and variant columns, whichever version
    of the export wrote it."""
    table = read_partition(root, "runs", name)
    if "variant_id" not in table.column_names:
        table = _with_variants(table)
    return retype_string_params(table, PARAM_PREFIX)


def load_runs(
    studies: str | Iterable[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> pd.DataFrame:
    """The runs table of one or several studies, params typed, with ``variant`` and ``seed``.

    A param two studies typed differently gets one type by the export's rule (``params``).
    """
    tables = unify_params([read_runs_table(n, root) for n in _as_list(studies)], PARAM_PREFIX)
    table = pa.concat_tables(tables, promote_options="permissive")
    params = [c for c in table.column_names if c.startswith(PARAM_PREFIX)]
    runs = table.drop_columns(params).to_pandas()
    for col in params:  # nullable ints and booleans, lists as tuples
        runs[col] = arrow_to_pandas(table.column(col), runs.index)
    runs = runs[table.column_names]
    runs["study"] = runs["study"].astype(str)
    for path, default in COMPACT_DEFAULTS.items():  # the config dump leaves these out at default
        if PARAM_PREFIX + path in runs:
            runs[PARAM_PREFIX + path] = runs[PARAM_PREFIX + path].fillna(default)
    return assign_variants(runs, seed_params, ignored_params)


def assign_variants(
    runs: pd.DataFrame,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> pd.DataFrame:
    """Set ``variant`` to one unique label per ``(study, variant_id)`` and add ``seed``."""
    runs = runs.copy()
    seed_col = PARAM_PREFIX + seed_params[0] if seed_params else None
    if seed_col and seed_col in runs.columns:
        runs["seed"] = runs[seed_col]
    else:
        runs["seed"] = pd.Series(pd.NA, index=runs.index, dtype="Int64")
    if runs.empty:
        return runs
    first = runs.drop_duplicates(VARIANT_KEY).set_index(VARIANT_KEY)
    skip = {PARAM_PREFIX + p for p in (*seed_params, *ignored_params)}
    config = first[[c for c in first.columns if c.startswith(PARAM_PREFIX) and c not in skip]]

    def differing(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """``k=v, ...`` of the params that tell these variants apart."""
        rows = config.loc[keys]
        cols = [c for c in rows.columns if len({_text(v) for v in rows[c]}) > 1]
        return {
            key: ", ".join(f"{c[len(PARAM_PREFIX) :]}={fmt(plain(rows.at[key, c]))}" for c in cols)
            for key in keys
        }

    labels = {
        key: label if isinstance(label, str) else "" for key, label in first["variant"].items()
    }
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, label in labels.items():
        # A label that is its id (or none): another tool's runs, named by their params below.
        nameless = label in {"", key[1]}
        groups.setdefault((key[0], "" if nameless else label), []).append(key)
    for (_, label), keys in groups.items():
        if label and len(keys) < 2:  # the expansion's labels are unique within a study
            continue
        extra = differing(keys)
        for key in keys:
            if label:
                labels[key] = f"{label} ({extra[key] or key[1]})"
            else:
                labels[key] = extra[key] if len(keys) > 1 and extra[key] else key[1]
    if runs["study"].nunique() > 1:
        labels = {key: f"{key[0]}/{label}" for key, label in labels.items()}
    keys = list(zip(runs["study"], runs["variant_id"], strict=True))
    runs["variant"] = [labels[k] for k in keys]
    return runs


def _text(value: Any) -> str:
    return json.dumps(plain(value), sort_keys=True)


def load_metrics(
    studies: str | Iterable[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    metrics: Sequence[str] | None = None,
    latest_per_step: bool = True,
) -> pd.DataFrame:
    """The long metrics table (``study, run_id, trial_id, step, metric, value, timestamp``).

    ``metrics`` limits the metric names read. With ``latest_per_step`` a step logged twice (a
    resumed trial) keeps only its latest value, which is what a learning curve should show.
    """
    frames = []
    filters = [("metric", "in", list(metrics))] if metrics is not None else None
    for name in _as_list(studies):
        # Dictionary-encoded ids and names: categoricals, which hash and group fast at 4M rows.
        table = read_partition(
            root, "metrics", name, filters=filters, read_dictionary=["run_id", "trial_id", "metric"]
        )
        frames.append(table.to_pandas())
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("study", "run_id", "trial_id", "metric"):
        if not isinstance(frame[col].dtype, pd.CategoricalDtype):  # concat of unlike categories
            frame[col] = frame[col].astype(str).astype("category")
    if latest_per_step and not frame.empty:
        frame = summary.latest_per_step(frame)
    return frame.reset_index(drop=True)


def load_study(
    studies: str | Iterable[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    metrics: Sequence[str] | None = None,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> Study:
    """Load one or several exported studies (by name) from ``root``."""
    runs = load_runs(studies, root, seed_params, ignored_params)
    long = load_metrics(studies, root, metrics)
    # Attach variant and seed through the run_id categories (1000s), not a 4M-row merge.
    per_run = runs.set_index("run_id").reindex(long["run_id"].cat.categories)
    codes = long["run_id"].cat.codes.to_numpy()
    long = long[per_run["variant"].notna().to_numpy()[codes]]  # runs missing from the runs table
    codes = long["run_id"].cat.codes.to_numpy()
    variants = pd.Categorical(per_run["variant"].fillna(""))
    long = long.assign(
        variant=pd.Categorical.from_codes(variants.codes[codes], variants.categories),
        seed=per_run["seed"].array.take(codes),
    )
    long["run_id"] = long["run_id"].cat.remove_unused_categories()
    long = long[["study", "run_id", "variant", "seed", "step", "metric", "value"]]
    return Study(runs=runs, metrics=long, variants=variant_table(runs, seed_params, ignored_params))


def variant_table(
    runs: pd.DataFrame,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> pd.DataFrame:
    """One row per variant: its label, id, study, number of runs and the params that define
    it (all but the seed and ``ignored_params``; equal across a variant's runs)."""
    skip = {PARAM_PREFIX + p for p in (*seed_params, *ignored_params)}
    params = [c for c in runs.columns if c.startswith(PARAM_PREFIX) and c not in skip]
    columns = ["variant", "variant_id", "n_runs", "study", *params]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    sizes = runs.groupby(VARIANT_KEY, sort=False).size().rename("n_runs")
    table = runs.drop_duplicates(VARIANT_KEY).join(sizes, on=VARIANT_KEY)[columns]
    return table.sort_values("variant", kind="stable").reset_index(drop=True)


def varying_params(variants: pd.DataFrame) -> list[str]:
    """Param names (no prefix) whose value differs between variants: the study's grid axes."""
    return [
        col[len(PARAM_PREFIX) :]
        for col in variants.columns
        if col.startswith(PARAM_PREFIX) and len({_text(v) for v in variants[col]}) > 1
    ]
