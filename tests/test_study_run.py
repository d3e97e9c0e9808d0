"""The Ray Tune runner end to end on a local Ray (one Ray start shared by the module).

Real components only: Ray Tune, the trainer on digits + MLP (one thread), sqlite MLflow, and a
real ``mlflow server`` that the test stops and restarts in the middle of a study.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from samstudy.study.runner import run_study  # noqa: E402
from samstudy.study.spec import StudySpec, study_from_mapping  # noqa: E402
from samstudy.study.worker import (  # noqa: E402
    EARLIER_EPOCHS,
    REPORT_CLOCK,
    TRIAL_CLOCK,
    epoch_results,
)

BASE = {
    "data": {"name": "digits"},
    "noise": {"kind": "symmetric", "rate": 0.4},
    "model": {"name": "mlp"},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "epochs": 3,
    "batch_size": 64,
    "threads": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def make_study(tmp: Path, name: str, tracking_uri: str | None = None, **fields: Any) -> StudySpec:
    data = {
        "name": name,
        "base": {**BASE, **fields.pop("base", {})},
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}"},
        **fields,
    }
    return study_from_mapping(data, path=tmp / f"{name}.yaml")


def child_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client.search_runs([exp.experiment_id], filter_string="tags.`samstudy.role` = 'trial'")


def steps(uri: str, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_grid_study_end_to_end_with_diverged_trial_then_complete(
    local_ray: None, tmp_path: Path
) -> None:
    spec = make_study(
        tmp_path,
        "e2e",
        base={"checkpoint_every": 5},  # no checkpoint in 3 epochs: results may be batched
        grid={"optimizer.name": ["sgd", "sam"], "optimizer.lr": [0.05, 1.0e12]},
    )
    trials = spec.expand()
    out = io.StringIO()
    result = run_study(spec, out=out, progress_interval_s=0.0)
    assert result.status == "complete", out.getvalue()
    assert result.tracking_pending == 0
    uri = result.tracking_uri
    expected = {t.trial_id: t for t in trials}
    runs = child_runs(uri, "e2e")
    assert len(runs) == 4
    by_id = {r.data.tags["samstudy.trial_id"]: r for r in runs}
    assert set(by_id) == set(expected)
    parent = MlflowClient(uri).search_runs(
        [runs[0].info.experiment_id], filter_string="tags.`samstudy.role` = 'parent'"
    )
    assert len(parent) == 1 and parent[0].data.tags["samstudy.status"] == "complete"
    for trial_id, run in by_id.items():
        trial = expected[trial_id]
        tags = run.data.tags
        assert run.info.run_name == trial.name
        assert tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert tags["samstudy.study"] == "e2e" and tags["samstudy.study_sha256"] == spec.sha256
        assert tags["samstudy.git_commit"] and tags["samstudy.version"]
        assert run.data.params["optimizer.name"] == trial.config["optimizer"]["name"]
        assert run.data.params["data.root"] == str(Path(trial.config["data"]["root"]).resolve())
        if trial.config["optimizer"]["lr"] > 1:
            assert tags["samstudy.status"] == "diverged", tags
            assert result.trials[trial_id] == "diverged"
            assert steps(uri, run.info.run_id, "epoch") == list(
                range(1, len(steps(uri, run.info.run_id, "epoch")) + 1)
            )
        else:
            assert tags["samstudy.status"] == "completed"
            assert run.info.status == "FINISHED"
            assert steps(uri, run.info.run_id) == [1, 2, 3]
            assert steps(uri, run.info.run_id, "test_acc") == [1, 2, 3]
    assert "completed" in out.getvalue() and "diverged" in out.getvalue()
    assert not any(k.startswith("_") for r in runs for k in r.data.metrics)  # worker clocks

    # Tune keeps only its JSON log (read by reconcile): no CSV / TensorBoard files per trial,
    # and every result carries the worker-side clocks, the time in tune.report within the total.
    # Epochs shorter than a second travel to the driver in batches; each epoch exactly once.
    trial_dirs = [d for d in (tmp_path / "ray" / "e2e").iterdir() if d.is_dir()]
    assert len(trial_dirs) == 4
    batched = 0
    for folder in trial_dirs:
        assert not list(folder.glob("progress.csv")) and not list(folder.glob("events.out*"))
        lines = (folder / "result.json").read_text().splitlines()
        results = [json.loads(line) for line in lines]
        assert results
        clocks = [(r[TRIAL_CLOCK], r[REPORT_CLOCK]) for r in results]
        assert all(0 <= in_report < total for total, in_report in clocks), clocks
        assert [c[0] for c in clocks] == sorted(c[0] for c in clocks)
        epochs = [int(e["epoch"]) for r in results for e in epoch_results(r)]
        assert epochs == list(range(1, len(epochs) + 1))
        batched += sum(len(r[EARLIER_EPOCHS]) for r in results)
    assert batched > 0
    # ... but the last result Tune keeps per trial, written into every snapshot of its
    # experiment state, holds only its own epoch.
    snapshots = list((tmp_path / "ray" / "e2e").glob("experiment_state-*.json"))
    assert snapshots and all(EARLIER_EPOCHS not in p.read_text() for p in snapshots)

    # Running a complete study again starts nothing and adds no runs.
    again = io.StringIO()
    second = run_study(spec, out=again)
    assert second.status == "already_complete"
    assert "is complete" in again.getvalue()
    assert len(child_runs(uri, "e2e")) == 4


class KillWorkerOnce(tune.Callback):
    """SIGKILLs the trial's worker process when it reports ``at_epoch`` (first time only)."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch
        self.killed_pid: int | None = None
        self.epochs: list[int] = []
        self.epochs_after_kill: list[int] = []
        self.checkpointed: list[int] = []  # the epochs whose results carried a checkpoint

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result["epoch"])
        self.epochs.append(epoch)
        if self.killed_pid is not None and result["pid"] != self.killed_pid:
            self.epochs_after_kill.append(epoch)
        if self.killed_pid is None and epoch == self.at_epoch:
            self.killed_pid = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)

    def on_checkpoint(self, trial: Any, **info: Any) -> None:
        self.checkpointed.append(int(trial.last_result["epoch"]))


def test_killed_worker_resumes_from_checkpoint_without_duplicate_steps(
    local_ray: None, tmp_path: Path
) -> None:
    spec = make_study(
        tmp_path, "killed", base={"epochs": 8, "checkpoint_every": 1}, checkpoint_min_s=0
    )
    killer = KillWorkerOnce(at_epoch=3)
    result = run_study(spec, callbacks=[killer], max_failures=2, out=io.StringIO())
    assert killer.killed_pid is not None
    assert result.status == "complete"
    # Resumed from a checkpoint (a restart from scratch would report epochs 1..3 again).
    assert killer.epochs_after_kill and min(killer.epochs_after_kill) >= 3
    assert killer.epochs_after_kill[-1] == 8
    (run,) = child_runs(result.tracking_uri, "killed")
    assert steps(result.tracking_uri, run.info.run_id) == list(range(1, 9))
    assert run.data.tags["samstudy.status"] == "completed"
    assert run.data.tags["samstudy.retried"] == "true"
    # checkpoints.keep_final: false (the default): the last epoch's checkpoint is never written
    assert killer.checkpointed and max(killer.checkpointed) == 7, killer.checkpointed


def test_search_study_with_optuna_and_asha(local_ray: None, tmp_path: Path) -> None:
    spec = make_study(
        tmp_path,
        "search",
        base={"epochs": 2, "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.05}},
        search={
            "algorithm": "tpe",
            "metric": "test_acc",
            "mode": "max",
            "num_samples": 3,
            "seed": 0,
            "params": {
                "optimizer.rho": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
                "batch_size": {"type": "categorical", "values": [32, 64]},
            },
            "asha": {"max_t": 2, "grace_period": 1, "reduction_factor": 2},
            "points_to_evaluate": [{"optimizer.rho": 0.123, "batch_size": 32}],
        },
    )
    result = run_study(spec, out=io.StringIO())
    assert result.status == "complete"
    # ASHA acts on every result: no epochs batched
    for folder in (d for d in (tmp_path / "ray" / "search").iterdir() if d.is_dir()):
        results = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        assert results and all(r[EARLIER_EPOCHS] == [] for r in results)
    runs = child_runs(result.tracking_uri, "search")
    assert len(runs) == 3
    assert len({r.data.tags["samstudy.trial_id"] for r in runs}) == 3
    for run in runs:
        assert run.data.tags["samstudy.status"] in ("completed", "stopped")
        rho = float(run.data.params["optimizer.rho"])
        assert 0.01 <= rho <= 0.2
        assert int(run.data.params["batch_size"]) in (32, 64)
    # the point to evaluate ran, as given (the study's reference for the report)
    assert [r for r in runs if r.data.params["optimizer.rho"] == "0.123"]
    assert run_study(spec, out=io.StringIO()).status == "already_complete"

    # --fresh: the old runs are soft-deleted and the study runs again from scratch.
    again = run_study(spec, fresh=True, out=io.StringIO())
    assert again.status == "complete"
    fresh_runs = child_runs(result.tracking_uri, "search")
    assert len(fresh_runs) == 3
    assert not {r.info.run_id for r in fresh_runs} & {r.info.run_id for r in runs}
    client = MlflowClient(result.tracking_uri)
    assert all(client.get_run(r.info.run_id).info.lifecycle_stage == "deleted" for r in runs)


# -- a real MLflow server, stopped and restarted mid-study -----------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group (its workers die with it)."""

    def __init__(self, db: Path, port: int) -> None:
        self.db, self.port = db, port
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.db}"]
        command += ["--default-artifact-root", str(self.db.parent / "artifacts")]
        # The server's job runner (a dozen huey workers for GenAI jobs) doubles its start time.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            command,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} not ready after {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class RestartServer(tune.Callback):
    """Stops the server at the first result and starts it again in the background."""

    def __init__(self, server: MlflowServer) -> None:
        self.server = server
        self.stopped_at: float | None = None
        self.results_while_down = 0
        self.restart: threading.Thread | None = None
        self._up = threading.Event()

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
            self.server.stop()
            self.restart = threading.Thread(target=self._restart, daemon=True)
            self.restart.start()
        elif not self._up.is_set():
            self.results_while_down += 1

    def _restart(self) -> None:
        time.sleep(2.0)
        self.server.start()
        self.server.wait_ready()
        self._up.set()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "server.db", _free_port())
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_mlflow_server_outage_loses_nothing(
    local_ray: None, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    spec = make_study(
        tmp_path,
        "served",
        tracking_uri=mlflow_server.uri,
        base={"epochs": 6},
        grid={"seed": [0, 1]},
    )
    outage = RestartServer(mlflow_server)
    result = run_study(spec, callbacks=[outage], out=io.StringIO(), flush_timeout_s=180.0)
    assert result.status == "complete"
    assert outage.stopped_at is not None and outage.results_while_down > 0
    assert result.tracking_pending == 0  # flushed once the server was back
    runs = child_runs(mlflow_server.uri, "served")
    assert len(runs) == 2
    for run in runs:
        assert steps(mlflow_server.uri, run.info.run_id) == [1, 2, 3, 4, 5, 6]
        assert run.data.tags["samstudy.status"] == "completed"
        assert run.info.status == "FINISHED"
