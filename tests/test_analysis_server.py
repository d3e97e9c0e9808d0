"""Export from a real ``mlflow server`` on 127.0.0.1 (batched REST reads), against the same store
read directly through SQL and against MLflow's own get_metric_history."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("server")
    db_uri = sqlite_store(tmp / "mlflow.db")
    port = _free_port()
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            db_uri,
            "--default-artifact-root",
            str(tmp / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        env=env,
        start_new_session=True,  # its own process group: the workers go down with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield {"url": url, "db_uri": db_uri, "tmp": tmp}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def logged(server: dict) -> dict:
    """A study logged *through the server* (12 trials, NaN and a re-logged step included)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=server["url"])
    trials = []
    for i in range(12):
        seed, variant = i % 3, ["sam", "same"][i // 6]
        metrics = {
            "train_acc": [0.1 * e + 0.01 * i for e in range(1, 9)],
            "test_acc": [0.5 + 0.02 * e - 0.003 * i for e in range(1, 9)],
            "region_ckpt1": [0.25 + 0.001 * e for e in range(1, 9)],
        }
        config = {"optimizer": {"name": variant, "rho": 0.05}, "seed": seed}
        trials.append(TrialData(f"{variant}-rho0.05-s{seed}-{i}", config, metrics))
    ids = log_study(client, "srv", trials)
    first = ids["t0000"]
    client.log_batch(
        first,
        metrics=[
            Metric("test_acc", float("nan"), 1_800_000_000_000, 8),
            Metric("test_acc", 0.42, 1_800_000_000_001, 9),
        ],
    )
    return {"client": client, "ids": ids}


def _sorted(table) -> pd.DataFrame:
    frame = table.to_pandas()
    return frame.sort_values(["run_id", "metric", "step", "timestamp"]).reset_index(drop=True)


def test_server_export_equals_sql_export_and_mlflow(
    server: dict, logged: dict, tmp_path: Path
) -> None:
    from samstudy.analysis.export import export_study

    via_server = export_study("srv", server["url"], root=tmp_path / "rest")
    via_sql = export_study("srv", server["db_uri"], root=tmp_path / "sql")
    assert "bulk history" in via_server.source
    assert via_server.n_runs == 12 and via_server.n_metric_rows == 12 * 3 * 8 + 2
    rest = pq.read_table(via_server.metrics_path)
    sql = pq.read_table(via_sql.metrics_path)
    assert rest.schema == sql.schema
    pd.testing.assert_frame_equal(_sorted(rest), _sorted(sql))  # NaN in the same places
    runs_rest = pq.read_table(via_server.runs_path).to_pandas().sort_values("run_id")
    runs_sql = pq.read_table(via_sql.runs_path).to_pandas().sort_values("run_id")
    assert list(runs_rest.columns) == list(runs_sql.columns)
    for col in runs_rest.columns:  # a missing value (None or NaN) equals a missing value
        rest_col, sql_col = (
            f[col].astype(object).fillna("<missing>") for f in (runs_rest, runs_sql)
        )
        np.testing.assert_array_equal(rest_col.to_numpy(), sql_col.to_numpy(), col)
    # and the values are MLflow's own
    client, frame = logged["client"], rest.to_pandas()
    first = logged["ids"]["t0000"]
    history = client.get_metric_history(first, "test_acc")
    mine = frame[(frame["run_id"] == first) & (frame["metric"] == "test_acc")].sort_values("step")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == mine["step"].tolist()
    got = dict(zip(mine["step"], mine["value"], strict=True))
    assert math.isnan(got[8]) and got[9] == 0.42
    runs = runs_rest.set_index("run_id")
    assert runs.at[first, "final.test_acc"] == 0.42 and runs.at[first, "num_steps"] == 9


def test_server_export_splits_truncated_batches(
    server: dict, logged: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a row cap below one batch's size the reader must split and ask again, losing nothing;
    with pages smaller than the study, search_runs is paged."""
    from samstudy.analysis import readers
    from samstudy.analysis.export import export_study

    reference = export_study("srv", server["url"], root=tmp_path / "a")
    monkeypatch.setattr(readers, "BULK_MAX_RESULTS", 20)  # 12 runs x 8 steps = 96 rows a batch
    monkeypatch.setattr(readers, "BULK_MAX_RUNS", 5)
    monkeypatch.setattr(readers, "SEARCH_PAGE", 5)  # 12 runs: three search_runs pages
    split = export_study("srv", server["url"], root=tmp_path / "b")
    assert split.n_runs == 12
    pd.testing.assert_frame_equal(
        _sorted(pq.read_table(split.metrics_path)), _sorted(pq.read_table(reference.metrics_path))
    )


def test_server_missing_study(server: dict, tmp_path: Path) -> None:
    from samstudy.analysis.export import export_study
    from samstudy.analysis.readers import StudyNotFoundError

    with pytest.raises(StudyNotFoundError, match="srv|none"):
        export_study("absent", server["url"], root=tmp_path)
