"""Bulk readers of one study from an MLflow tracking store (the export's input).

On a SQL store (sqlite, PostgreSQL, MySQL): one SQL query per table (experiments, runs, tags,
params, metrics) through SQLAlchemy on the store's database URI, inside one transaction. On a
tracking server: ``search_runs`` pages plus the server's bulk history endpoint
(``/ajax-api/2.0/mlflow/metrics/get-history-bulk``: up to 100 runs per call, every logged value).
Neither path makes one call per run and metric; other stores fall back to the client loop.
Every reader returns a :class:`RawStudy`: runs with MLflow's strings, metrics as an Arrow table.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from samstudy import paths
from samstudy.paths import redact

log = logging.getLogger(__name__)

SQL_BACKENDS = {"sqlite", "postgresql", "mysql", "mssql"}
HTTP_SCHEMES = {"http", "https"}
BULK_HISTORY_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
BULK_MAX_RUNS = 100  # the server refuses more run ids per call
BULK_MAX_RESULTS = 25000  # the server truncates silently at this many rows per call
SEARCH_PAGE = 1000  # runs per search_runs page (MLflow's default page size)
_FETCH_ROWS = 250_000


class StudyNotFoundError(LookupError):
    """The tracking store has no (active) experiment named after the study."""


@dataclass
class RunRecord:
    """One MLflow run as read from the store (params and tags as MLflow's strings)."""

    run_id: str
    run_name: str | None
    mlflow_status: str | None
    start_time: int | None  # ms since the epoch
    end_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RawStudy:
    """Everything an export needs, before selection and shaping."""

    study: str
    runs: list[RunRecord]
    # run_id, metric, step, value, timestamp (int ms): every logged row of the experiment's runs
    metrics: pa.Table
    source: str


def _raw_metrics_table(
    run_ids: Sequence[str],
    keys: Sequence[str],
    steps: Sequence[int],
    values: Sequence[float],
    timestamps: Sequence[int],
) -> pa.Table:
    return pa.table(
        {
            "run_id": pa.array(run_ids, pa.string()),
            "metric": pa.array(keys, pa.string()),
            "step": pa.array(steps, pa.int64()),
            "value": pa.array(values, pa.float64()),
            "timestamp": pa.array(timestamps, pa.int64()),
        }
    )


def is_sql_uri(uri: str) -> bool:
    """True for SQLAlchemy database URIs (``sqlite:///mlflow.db``, ``postgresql+psycopg2://``)."""
    return uri.split(":", 1)[0].split("+", 1)[0].lower() in SQL_BACKENDS


def read_sql_store(db_uri: str, study: str, rowid_keys: bool | None = None) -> RawStudy:
    """Read a study from an MLflow SQL store: one query per table (experiments, runs, tags,
    params, metrics).

    ``rowid_keys`` (default: on sqlite) identifies runs by rowid in the metrics query; off,
    by run id, as on other databases.
    """
    import sqlalchemy as sa

    url = sa.engine.make_url(db_uri)
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite:
        database = url.database or ""
        # sqlite would silently create an empty database at a mistyped path
        if database in {"", ":memory:"} or not Path(database).exists():
            raise StudyNotFoundError(f"no MLflow database at {redact(db_uri)!r}")
        options: dict[str, Any] = {}
    else:
        # One snapshot for all queries (MVCC: writers are not blocked). sqlite gets none: its
        # read lock would stall a running study's writes for the whole export.
        options = {"isolation_level": "REPEATABLE READ"}
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect().execution_options(**options) as conn:
            experiments = conn.execute(
                sa.text(
                    "SELECT experiment_id FROM experiments "
                    "WHERE name = :name AND lifecycle_stage = 'active'"
                ),
                {"name": study},
            ).fetchall()
            if not experiments:
                names = conn.execute(
                    sa.text("SELECT name FROM experiments WHERE lifecycle_stage = 'active'")
                ).fetchall()
                raise _not_found(study, db_uri, [n for (n,) in names])
            if len(experiments) > 1:
                raise StudyNotFoundError(
                    f"{len(experiments)} active experiments are named {study!r} in "
                    f"{redact(db_uri)} (several MLflow workspaces?): cannot tell which is the "
                    "study"
                )
            # An integer read from the database: safe to inline, which the raw cursor below needs.
            exp_id = int(experiments[0][0])
            in_exp = f"WHERE r.experiment_id = {exp_id} AND r.lifecycle_stage = 'active'"
            # On sqlite the metrics query returns each run's rowid, a small integer, instead of
            # its 32-character id: a third of the read time at 4M rows. A rowid is fixed per
            # run, so a run created between the queries cannot shift the mapping.
            rowid_keys = sqlite if rowid_keys is None else rowid_keys and sqlite
            run_key = "r.rowid" if rowid_keys else "r.run_uuid"
            run_rows = conn.execute(
                sa.text(
                    f"SELECT r.run_uuid, {run_key}, r.name, r.status, r.start_time, r.end_time "
                    f"FROM runs r {in_exp}"
                )
            ).fetchall()
            join = f"JOIN runs r ON r.run_uuid = x.run_uuid {in_exp}"
            tag_rows = conn.execute(
                sa.text(f"SELECT x.run_uuid, x.key, x.value FROM tags x {join}")
            ).fetchall()
            param_rows = conn.execute(
                sa.text(f"SELECT x.run_uuid, x.key, x.value FROM params x {join}")
            ).fetchall()
            true = sa.literal(True).compile(
                dialect=engine.dialect, compile_kwargs={"literal_binds": True}
            )
            metrics_sql = (
                f"SELECT {run_key}, x.key, x.step, "
                f"CASE WHEN x.is_nan = {true} THEN NULL ELSE x.value END, x.timestamp "
                f"FROM metrics x {join}"
            )
            # Through the DBAPI cursor of the same connection (and transaction): SQLAlchemy's
            # Row objects cost as much as the read itself at millions of rows.
            dbapi = conn.connection.dbapi_connection
            # PostgreSQL: a server-side cursor, or the driver holds every row in memory at once.
            postgres = url.get_backend_name() == "postgresql"
            cursor = dbapi.cursor(name="samstudy_export") if postgres else dbapi.cursor()
            chunks = []
            # Millions of short-lived tuples (no cycles) set the cyclic GC off over and over.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                cursor.execute(metrics_sql)
                # In chunks: millions of rows as Python tuples would take gigabytes at once.
                while rows := cursor.fetchmany(_FETCH_ROWS):
                    chunks.append(_metric_chunk(rows, rowid_keys))
            finally:
                if gc_was_enabled:
                    gc.enable()
                cursor.close()
    finally:
        engine.dispose()

    runs = {r[0]: RunRecord(r[0], r[2], r[3], r[4], r[5]) for r in run_rows}
    for run_id, key, value in tag_rows:
        if run_id in runs:
            runs[run_id].tags[key] = value
    for run_id, key, value in param_rows:
        if run_id in runs:
            runs[run_id].params[key] = value
    if not chunks:
        table = _raw_metrics_table([], [], [], [], [])
    elif rowid_keys:
        table = pa.concat_tables(chunks).combine_chunks()
        rowids = table["run_id"].to_numpy()
        ids = [r[0] for r in run_rows]
        lut = np.full(max([int(r[1]) for r in run_rows] + [int(rowids.max())]) + 1, -1, np.int64)
        lut[[int(r[1]) for r in run_rows]] = np.arange(len(ids))
        index = lut[rowids]
        # A run missing from the runs query (created in between) gets a null run id: dropped.
        run_id = pa.DictionaryArray.from_arrays(
            pa.array(index.astype(np.int32), mask=index < 0), pa.array(ids, pa.string())
        )
        table = table.set_column(0, "run_id", run_id)
    else:
        table = pa.concat_tables(chunks)
    return RawStudy(study, list(runs.values()), table, source=redact(db_uri))


def _metric_chunk(rows: Sequence[Sequence[Any]], integer_keys: bool) -> pa.Table:
    """(run key, metric, step, value or NULL for NaN, timestamp) rows -> columns."""
    run_col, key_col, step_col, value_col, ts_col = zip(*rows)  # noqa: B905
    values = pa.array(value_col, pa.float64())
    if values.null_count:  # MLflow stores NaN as value 0 with is_nan set; the query gave NULL
        values = values.fill_null(float("nan"))
    return pa.table(
        {
            "run_id": pa.array(run_col, pa.int64() if integer_keys else pa.string()),
            "metric": pa.array(key_col, pa.string()),
            "step": pa.array(step_col, pa.int64()),
            "value": values,
            "timestamp": pa.array(ts_col, pa.int64()),
        }
    )


def _not_found(study: str, where: str, names: Sequence[str]) -> StudyNotFoundError:
    shown = ", ".join(sorted(names)[:20]) or "none"
    return StudyNotFoundError(
        f"no active MLflow experiment named {study!r} in {redact(where)} "
        f"(experiments there: {shown}); run `make study NAME={study}` first, "
        "or point MLFLOW_TRACKING_URI / --tracking-uri at the right store"
    )


def _search_all_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every active run of the experiment, page after page (MLflow's own paging helper)."""
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    return get_results_from_paginated_fn(
        lambda max_results, token: client.search_runs(
            [experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=max_results,
            page_token=token,
        ),
        SEARCH_PAGE,
    )


def _records_from_search(found: Sequence[Any]) -> list[RunRecord]:
    return [
        RunRecord(
            run.info.run_id,
            run.info.run_name,
            run.info.status,
            run.info.start_time,
            run.info.end_time,
            dict(run.data.params),
            dict(run.data.tags),
        )
        for run in found
    ]


def read_tracking_server(uri: str, study: str, workers: int = 4) -> RawStudy:
    """Read a study from an MLflow tracking server with batched calls.

    ``search_runs`` pages give runs, params, tags and the metric keys; the bulk history endpoint
    gives every logged value of one metric for up to 100 runs per call. A call that comes back
    with the server's row cap may be truncated: it is split in half and asked again, so no value
    is lost. Servers without the endpoint fall back to ``get_metric_history`` per run and key.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None or experiment.lifecycle_stage != "active":
        names = [e.name for e in client.search_experiments()]
        raise _not_found(study, uri, names)
    found = _search_all_runs(client, experiment.experiment_id)
    records = _records_from_search(found)
    runs_by_key: dict[str, list[str]] = {}
    for run in found:
        for key in run.data.metrics:
            runs_by_key.setdefault(key, []).append(run.info.run_id)
    host_creds = get_default_host_creds(uri)

    def fetch(key: str, run_ids: list[str]) -> list[dict[str, Any]]:
        response = http_request(
            host_creds,
            BULK_HISTORY_ENDPOINT,
            "GET",
            params={"run_id": run_ids, "metric_key": key, "max_results": BULK_MAX_RESULTS},
            raise_on_status=False,
        )
        if response.status_code == 404:
            raise _NoBulkEndpointError
        if response.status_code != 200:
            raise MlflowException(
                f"{BULK_HISTORY_ENDPOINT} answered {response.status_code}: {response.text[:300]}"
            )
        rows = response.json().get("metrics", [])
        if len(rows) >= BULK_MAX_RESULTS:  # maybe truncated: split and ask again
            if len(run_ids) == 1:
                raise MlflowException(
                    f"run {run_ids[0]} has more than {BULK_MAX_RESULTS} values of {key!r}"
                )
            half = len(run_ids) // 2
            return fetch(key, run_ids[:half]) + fetch(key, run_ids[half:])
        return rows

    jobs = [
        (key, ids[i : i + BULK_MAX_RUNS])
        for key, ids in sorted(runs_by_key.items())
        for i in range(0, len(ids), BULK_MAX_RUNS)
    ]
    try:
        # A few requests in flight hide the round trips; the server does the heavy lifting.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            chunks = list(pool.map(lambda job: fetch(*job), jobs))
        rows = [row for chunk in chunks for row in chunk]
        table = _raw_metrics_table(
            [r["run_id"] for r in rows],
            [r["key"] for r in rows],
            [int(r.get("step", 0)) for r in rows],
            [float(r["value"]) for r in rows],
            [int(r.get("timestamp", 0)) for r in rows],
        )
        source = f"{redact(uri)} (bulk history)"
    except _NoBulkEndpointError:
        log.warning("%s has no bulk history endpoint: one call per run and metric", redact(uri))
        table = _history_loop(client, runs_by_key)
        source = f"{redact(uri)} (history loop)"
    return RawStudy(study, records, table, source=source)


class _NoBulkEndpointError(Exception):
    pass


def _history_loop(client: Any, runs_by_key: dict[str, list[str]]) -> pa.Table:
    cols: dict[str, list[Any]] = {"run_id": [], "metric": [], "step": [], "value": [], "ts": []}
    for key, run_ids in runs_by_key.items():
        for run_id in run_ids:
            for m in client.get_metric_history(run_id, key):
                cols["run_id"].append(run_id)
                cols["metric"].append(key)
                cols["step"].append(m.step)
                cols["value"].append(m.value)
                cols["ts"].append(m.timestamp)
    return _raw_metrics_table(
        cols["run_id"], cols["metric"], cols["step"], cols["value"], cols["ts"]
    )


def read_with_client(uri: str, study: str) -> RawStudy:
    """Any other store (e.g. a ``file:`` store): the plain client, one history call per metric."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise _not_found(study, uri, [e.name for e in client.search_experiments()])
    found = _search_all_runs(client, experiment.experiment_id)
    runs_by_key: dict[str, list[str]] = {}
    for run in found:
        for key in run.data.metrics:
            runs_by_key.setdefault(key, []).append(run.info.run_id)
    table = _history_loop(client, runs_by_key)
    source = f"{redact(uri)} (history loop)"
    return RawStudy(study, _records_from_search(found), table, source=source)


def read_study(
    study: str, tracking_uri: str | None = None, experiment: str | None = None
) -> RawStudy:
    """Read with the fastest reader for the URI (default and relative sqlite paths: the rule of
    ``samstudy.paths``, as for ``samstudy study``) from ``experiment`` (default: the study name);
    the result is labelled ``study`` either way."""
    tracking_uri = paths.resolve_tracking_uri(tracking_uri)
    name = experiment or study
    scheme = tracking_uri.split(":", 1)[0].lower()
    if is_sql_uri(tracking_uri):
        raw = read_sql_store(tracking_uri, name)
    elif scheme in HTTP_SCHEMES:
        raw = read_tracking_server(tracking_uri, name)
    else:
        raw = read_with_client(tracking_uri, name)
    raw.study = study
    return raw
