"""Studies with known contents, logged to MLflow in the samstudy layout (tests, benchmark, demos).

``log_study`` goes through the real MLflow client (parent run, child runs, tags, flattened params,
per-epoch metrics with step = epoch), exactly as the study tracker does, variant tags included
(``variant_tags=False`` logs a run as versions before those tags did). ``bulk_insert_study``
writes the same rows straight into a sqlite store's tables, which makes a 4-million-value store
in seconds for the export benchmark; ``copy_study_to_postgres`` copies such a study into an
MLflow PostgreSQL store with ``COPY`` (the benchmark's PostgreSQL row).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samstudy import tags
from samstudy.identity import identify, mlflow_params, unflatten_params

BASE_TIME_MS = 1_700_000_000_000


def sqlite_store(path: str | os.PathLike[str]) -> str:
    """Make an empty MLflow sqlite store at ``path`` and return its URI.

    Creating MLflow's tables runs its migrations (seconds); the empty store is made once per
    MLflow version in the temp folder and copied after that.
    """
    import mlflow
    from filelock import FileLock
    from mlflow import MlflowClient

    cache = Path(tempfile.gettempdir()) / f"samstudy-empty-mlflow-{mlflow.__version__}.db"
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            staging = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            staging.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{staging}").search_experiments()
            os.replace(staging, cache)
    shutil.copyfile(cache, path)
    return f"sqlite:///{Path(path).resolve()}"


@dataclass
class TrialData:
    """One trial: its config (flattened or nested), seed, and per-epoch metric lists.

    ``overrides`` are the paths the trial varies (the expansion's, for the variant label);
    ``variant`` / ``variant_id`` default to what ``samstudy.identity.identify`` gives for the
    config and overrides, as at expansion.
    """

    run_name: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Sequence[float]]  # metric -> values for epochs 1..E
    status: str = "completed"
    trial_id: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    variant: str | None = None
    variant_id: str | None = None

    def variant_tags(self) -> dict[str, str]:
        """The ``samstudy.variant`` / ``samstudy.variant_id`` tags of this trial."""
        if self.variant and self.variant_id:
            return {tags.VARIANT: self.variant, tags.VARIANT_ID: self.variant_id}
        # Through the MLflow params and back: the config the export sees, nested or not.
        ident = identify(unflatten_params(mlflow_params(self.params)), dict(self.overrides))
        return {
            tags.VARIANT: self.variant or ident["variant"],
            tags.VARIANT_ID: self.variant_id or ident["variant_id"],
        }


def log_study(
    client: Any,
    study: str,
    trials: Sequence[TrialData],
    epoch_ms: int = 1000,
    variant_tags: bool = True,
) -> dict[str, str]:
    """Log a study with the MLflow client; returns ``{trial_id: run_id}``.

    ``variant_tags=False`` leaves out ``samstudy.variant`` / ``samstudy.variant_id``, as
    versions before them logged trials (the export then derives them).
    """
    from mlflow.entities import Metric, Param

    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(study)
    parent = client.create_run(
        exp_id, run_name=study, tags={tags.ROLE: tags.ROLE_PARENT, tags.STUDY: study}
    )
    ids: dict[str, str] = {}
    for index, trial in enumerate(trials):
        trial_id = trial.trial_id or f"t{index:04d}"
        run_tags = {
            tags.ROLE: tags.ROLE_TRIAL,
            tags.STUDY: study,
            tags.TRIAL_ID: trial_id,
            tags.STATUS: trial.status,
            tags.SHA: "0" * 64,
            tags.GIT: "synthetic",
            tags.VERSION: "0.1.0",
            tags.OVERRIDES: json.dumps(dict(trial.overrides), sort_keys=True),
            tags.PARENT: parent.info.run_id,
            **(trial.variant_tags() if variant_tags else {}),
            **trial.extra_tags,
        }
        run = client.create_run(exp_id, run_name=trial.run_name, tags=run_tags)
        run_id = run.info.run_id
        # the study tracker's own writer (flatten_config + its string format): one params format
        params = [Param(k, v) for k, v in mlflow_params(trial.params).items()]
        metrics = [
            Metric(key, float(value), BASE_TIME_MS + epoch * epoch_ms, epoch)
            for key, values in trial.metrics.items()
            for epoch, value in enumerate(values, start=1)
        ]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        mlflow_status = "FAILED" if trial.status == "failed" else "FINISHED"
        client.set_terminated(run_id, status=mlflow_status)
        ids[trial_id] = run_id
    client.set_terminated(parent.info.run_id)
    return ids


def bulk_insert_study(
    db_path: str,
    client: Any,
    study: str,
    n_runs: int,
    metric_names: Sequence[str],
    epochs: int,
    seed: int = 0,
) -> list[str]:
    """Fill a sqlite MLflow store with ``n_runs`` trials x metrics x epochs by direct inserts.

    The experiment and one template run come from the real client (so every column MLflow
    expects is set); the rest is copied with ``executemany``. Values are deterministic.
    Returns the run ids.
    """
    import random

    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(study)
    template = client.create_run(exp_id, run_name="template")
    rng = random.Random(seed)
    variant_of: dict[str, dict[str, str]] = {}  # identify once per distinct config
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA journal_mode = MEMORY")
        cur = conn.execute("SELECT * FROM runs WHERE run_uuid = ?", (template.info.run_id,))
        cols = [d[0] for d in cur.description]
        row = list(cur.fetchone())
        conn.execute("DELETE FROM tags WHERE run_uuid = ?", (template.info.run_id,))
        conn.execute("DELETE FROM runs WHERE run_uuid = ?", (template.info.run_id,))
        run_ids = [uuid.uuid4().hex for _ in range(n_runs)]
        run_rows, tag_rows, param_rows = [], [], []
        for i, run_id in enumerate(run_ids):
            values = dict(zip(cols, row, strict=True))
            seed_i = i % 3
            name = f"same[{i // 3 % 4},0,0,0]-rho{0.05 * (1 + i // 12 % 4):.2f}-mlp-s{seed_i}"
            values.update(run_uuid=run_id, name=name, status="FINISHED")
            run_rows.append([values[c] for c in cols])
            params = {
                "optimizer.name": "same",
                "optimizer.rho": str(0.05 * (1 + i // 12 % 4)),
                "optimizer.scales": json.dumps([i // 3 % 4, 0, 0, 0]),
                "seed": str(seed_i),
                "epochs": str(epochs),
            }
            key = json.dumps({k: v for k, v in params.items() if k != "seed"}, sort_keys=True)
            if key not in variant_of:
                variant_of[key] = identify(unflatten_params(params))
            tag_rows += [
                (tags.ROLE, tags.ROLE_TRIAL, run_id),
                (tags.TRIAL_ID, f"t{i:05d}", run_id),
                (tags.STATUS, "completed", run_id),
                (tags.STUDY, study, run_id),
                (tags.VARIANT, variant_of[key]["variant"], run_id),
                (tags.VARIANT_ID, variant_of[key]["variant_id"], run_id),
                ("mlflow.runName", name, run_id),
            ]
            param_rows += [(k, v, run_id) for k, v in params.items()]
        marks = ",".join("?" * len(cols))
        conn.executemany(f"INSERT INTO runs ({','.join(cols)}) VALUES ({marks})", run_rows)
        conn.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tag_rows)
        conn.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", param_rows)

        def metric_rows():
            for run_id in run_ids:
                for key in metric_names:
                    level = rng.random()
                    for step in range(1, epochs + 1):
                        value = level * step / epochs
                        yield key, value, BASE_TIME_MS + step * 1000, step, 0, run_id

        conn.executemany(
            "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            metric_rows(),
        )
        # latest_metrics feeds search_runs; one row per run and key, at the last step
        conn.execute(
            "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
            "SELECT key, value, timestamp, step, is_nan, run_uuid FROM metrics WHERE step = ?",
            (epochs,),
        )
        conn.commit()
    finally:
        conn.close()
    return run_ids


def copy_study_to_postgres(db_path: str, pg_uri: str, study: str) -> int:
    """Copy study ``study`` of a sqlite MLflow store into the MLflow PostgreSQL store at
    ``pg_uri`` (same MLflow version, so the same tables): its experiment is made with the
    client, its runs, tags, params, metrics and latest metrics copied with ``COPY``.
    Returns the number of metric rows copied."""
    import psycopg
    from mlflow import MlflowClient

    pg_exp = MlflowClient(tracking_uri=pg_uri).create_experiment(study)
    src = sqlite3.connect(db_path)
    try:
        (exp_id,) = src.execute(
            "SELECT experiment_id FROM experiments WHERE name = ?", (study,)
        ).fetchone()
        in_exp = "run_uuid IN (SELECT run_uuid FROM runs WHERE experiment_id = ?)"
        queries = {
            "runs": "SELECT * FROM runs WHERE experiment_id = ?",
            "tags": f"SELECT * FROM tags WHERE {in_exp}",
            "params": f"SELECT * FROM params WHERE {in_exp}",
            "latest_metrics": f"SELECT * FROM latest_metrics WHERE {in_exp}",
            "metrics": f"SELECT * FROM metrics WHERE {in_exp}",
        }
        copied = 0
        with psycopg.connect(pg_uri) as dst, dst.cursor() as cursor:
            for table, query in queries.items():
                rows = src.execute(query, (exp_id,))
                cols = [d[0] for d in rows.description]
                at = cols.index("experiment_id") if table == "runs" else -1
                with cursor.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                    for row in rows:
                        if at >= 0:
                            row = (*row[:at], int(pg_exp), *row[at + 1 :])
                        copy.write_row(row)
                        copied += table == "metrics"
    finally:
        src.close()
    return copied
