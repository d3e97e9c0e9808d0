"""Studies with known contents, logged to MLflow in the samstudy layout (tests, benchmark, demos).

``log_study`` goes through the real MLflow client (parent run, child runs, tags, flattened params,
per-epoch metrics with step = epoch), exactly as the study tracker does. ``bulk_insert_study``
writes the same rows straight into a sqlite store's tables, which makes a 4-million-value store
in seconds for the export benchmark.
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
    """One trial: its config (flattened or nested), seed, and per-epoch metric lists."""

    run_name: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Sequence[float]]  # metric -> values for epochs 1..E
    status: str = "completed"
    trial_id: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)


def log_study(
    client: Any,
    study: str,
    trials: Sequence[TrialData],
    epoch_ms: int = 1000,
) -> dict[str, str]:
    """Log a study with the MLflow client; returns ``{trial_id: run_id}``."""
    from mlflow.entities import Metric, Param

    from samstudy.identity import mlflow_params

    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(study)
    parent = client.create_run(
        exp_id, run_name=study, tags={"samstudy.role": "parent", "samstudy.study": study}
    )
    ids: dict[str, str] = {}
    for index, trial in enumerate(trials):
        trial_id = trial.trial_id or f"t{index:04d}"
        tags = {
            "samstudy.role": "trial",
            "samstudy.study": study,
            "samstudy.trial_id": trial_id,
            "samstudy.status": trial.status,
            "samstudy.study_sha256": "0" * 64,
            "samstudy.git_commit": "synthetic",
            "samstudy.version": "0.1.0",
            "mlflow.parentRunId": parent.info.run_id,
            **trial.extra_tags,
        }
        run = client.create_run(exp_id, run_name=trial.run_name, tags=tags)
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
            tag_rows += [
                ("samstudy.role", "trial", run_id),
                ("samstudy.trial_id", f"t{i:05d}", run_id),
                ("samstudy.status", "completed", run_id),
                ("samstudy.study", study, run_id),
                ("mlflow.runName", name, run_id),
            ]
            param_rows += [
                ("optimizer.name", "same", run_id),
                ("optimizer.rho", str(0.05 * (1 + i // 12 % 4)), run_id),
                ("optimizer.scales", json.dumps([i // 3 % 4, 0, 0, 0]), run_id),
                ("seed", str(seed_i), run_id),
                ("epochs", str(epochs), run_id),
            ]
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
