"""Load exported studies from Parquet into tidy pandas frames, and label variants.

A *variant* is a trial config minus its seed: the runs of one variant differ only in
``seed`` (and in bookkeeping params that cannot change the maths, ``IGNORED_PARAMS``). Its label
is the run name minus the seed suffix (``same[2,0,0,0]-rho0.1-mlp-s1`` ->
``same[2,0,0,0]-rho0.1-mlp``); labels that would collide get the differing params appended.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from samstudy.analysis.schema import DEFAULT_ROOT, PARAM_PREFIX, read_partition

SEED_PARAMS: tuple[str, ...] = ("seed",)
# Params that say where or how fast a trial ran, not what it computed.
IGNORED_PARAMS: tuple[str, ...] = (
    "device",
    "threads",
    "data.root",
    "data.download",
    "data.num_workers",
    "checkpoint_every",
)
_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)\d+$")
_INT = re.compile(r"^[-+]?\d+$")


@dataclass
class Study:
    """One or several exported studies as tidy frames.

    ``runs``: one row per trial (``run_id``, ``trial_id``, ``study``, ``status``, typed
    ``params.*``, ``final.*``, ``best.*``, plus ``variant``, ``seed``).
    ``metrics``: long, one row per (run, metric, step), the latest value when a step was logged
    twice: ``study, run_id, variant, seed, step, metric, value``.
    ``variants``: one row per variant: ``variant`` and the params that define it.
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


def parse_param(values: pd.Series) -> pd.Series:
    """Type a column of MLflow param strings: int, float or bool when every value is one.

    The tracker writes params as JSON (``0.05``, ``true``, ``null``, ``[1, 0, 0, 0]``); Python
    spellings (``True``) are accepted too. ``null`` is a missing value; lists stay strings.
    """
    values = values.astype(object).where(values.notna() & (values != "null"), None)
    present = values.dropna().astype(str)
    if present.empty:
        return values
    if present.map(lambda v: bool(_INT.match(v))).all():
        return pd.to_numeric(values, errors="coerce").astype("Int64")
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.notna().all():
        return pd.to_numeric(values, errors="coerce").astype(float)
    booleans = {"true": True, "false": False}
    if present.str.lower().isin(list(booleans)).all():
        return values.map(lambda v: None if v is None else booleans[str(v).lower()]).astype(
            "boolean"
        )
    return values


def load_runs(
    studies: str | Iterable[str],
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> pd.DataFrame:
    """The runs table of one or several studies, params typed, with ``variant`` and ``seed``."""
    tables = [read_partition(root, "runs", name) for name in _as_list(studies)]
    table = pa.concat_tables(tables, promote_options="permissive")
    runs = table.to_pandas()
    runs["study"] = runs["study"].astype(str)
    for col in [c for c in runs.columns if c.startswith(PARAM_PREFIX)]:
        runs[col] = parse_param(runs[col])
    return assign_variants(runs, seed_params, ignored_params)


def assign_variants(
    runs: pd.DataFrame,
    seed_params: Sequence[str] = SEED_PARAMS,
    ignored_params: Sequence[str] = IGNORED_PARAMS,
) -> pd.DataFrame:
    """Add ``variant`` (label), ``variant_key`` (its params as JSON) and ``seed`` columns."""
    runs = runs.copy()
    skip = {PARAM_PREFIX + p for p in (*seed_params, *ignored_params)}
    config_cols = sorted(c for c in runs.columns if c.startswith(PARAM_PREFIX) and c not in skip)
    # The study is part of the variant: the same config in two studies is two variants.
    runs["variant_key"] = [
        json.dumps(
            {
                "study": row[0],
                **{
                    c[len(PARAM_PREFIX) :]: _plain(v)
                    for c, v in zip(config_cols, row[1:], strict=True)
                },
            },
            sort_keys=True,
        )
        for row in runs[["study", *config_cols]].itertuples(index=False, name=None)
    ]
    seed_col = PARAM_PREFIX + seed_params[0] if seed_params else None
    if seed_col and seed_col in runs.columns:
        runs["seed"] = runs[seed_col]
    else:
        runs["seed"] = pd.Series(pd.NA, index=runs.index, dtype="Int64")
    base = runs["run_name"].fillna("").map(lambda n: _SEED_SUFFIX.sub("", n))
    labels: dict[str, str] = {}
    for key, group in runs.groupby("variant_key", sort=True):
        names = sorted({n for n in base[group.index] if n})
        labels[key] = names[0] if names else ""
    _fill_and_disambiguate(labels, multi_study=runs["study"].nunique() > 1)
    runs["variant"] = runs["variant_key"].map(labels)
    return runs


def _plain(value: Any) -> Any:
    """JSON-able scalar (pandas NA -> None, numpy -> Python)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _fill_and_disambiguate(labels: dict[str, str], multi_study: bool) -> None:
    """Give nameless variants a label from their params and make colliding labels unique."""
    params = {key: json.loads(key) for key in labels}
    varying = {
        k
        for k in {k for p in params.values() for k in p}
        if len({json.dumps(p.get(k)) for p in params.values()}) > 1 and k != "study"
    }
    for key, label in labels.items():
        if not label:
            labels[key] = ", ".join(f"{k}={params[key].get(k)}" for k in sorted(varying)) or "all"
    by_label: dict[str, list[str]] = {}
    for key, label in labels.items():
        by_label.setdefault(label, []).append(key)
    for label, keys in by_label.items():
        if len(keys) < 2:
            continue
        differing = sorted(
            k
            for k in {k for key in keys for k in params[key]}
            if len({json.dumps(params[key].get(k)) for key in keys}) > 1
        )
        for key in keys:
            extra = ", ".join(f"{k}={params[key].get(k)}" for k in differing)
            labels[key] = f"{label} ({extra})"
    if multi_study:
        for key in labels:
            if f"{params[key]['study']}/" not in labels[key]:
                labels[key] = f"{params[key]['study']}/{labels[key]}"


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
        key = ["run_id", "metric", "step"]
        dup = frame.duplicated(key, keep=False).to_numpy()
        if dup.any():  # rare (a resumed trial): only those rows need sorting by time
            latest = frame[dup].sort_values("timestamp", kind="stable")
            latest = latest.drop_duplicates(key, keep="last").index
            frame = frame[~dup | frame.index.isin(latest)]
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
    return Study(runs=runs, metrics=long, variants=variant_table(runs))


def variant_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: its label, study, number of seeds and the params that define it."""
    rows = []
    for key, group in runs.groupby("variant_key", sort=True):
        params = json.loads(key)
        rows.append(
            {
                "variant": group["variant"].iloc[0],
                "n_runs": len(group),
                **{PARAM_PREFIX + k if k != "study" else k: v for k, v in params.items()},
            }
        )
    table = pd.DataFrame(rows, columns=None if rows else ["variant", "n_runs", "study"])
    return table.sort_values("variant", kind="stable").reset_index(drop=True)


def varying_params(variants: pd.DataFrame) -> list[str]:
    """Param names (no prefix) whose value differs between variants: the study's grid axes."""
    out = []
    for col in variants.columns:
        if col.startswith(PARAM_PREFIX):
            values = {json.dumps(_plain(v)) for v in variants[col]}
            if len(values) > 1:
                out.append(col[len(PARAM_PREFIX) :])
    return out
