"""Interrupting the driver: ``samstudy study`` in a subprocess, stopped by SIGINT and by SIGKILL,
then run again until the study completes with exactly one MLflow run per trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


def write_study(tmp: Path) -> Path:
    study = {
        "name": "interrupted",
        "base": {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.05},
            "epochs": EPOCHS,
            "threads": 1,
            "device": "cpu",
            "checkpoint_every": 1,
        },
        "grid": {"seed": [0, 1, 2, 3]},
        "checkpoint_min_s": 0,  # every epoch's checkpoint kept: the rerun resumes mid-trial
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    path = tmp / "interrupted.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def driver(study: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "samstudy", "study", str(study), "--num-cpus", "2"]
    command += ["--progress-interval", "0"]
    # Its own session: after a SIGKILL the test can still reap the Ray processes it started.
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_until(process: subprocess.Popen, marker: str, timeout: float = 240.0) -> list[str]:
    """Read the driver's output until a line contains ``marker``."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} in driver output:\n{''.join(lines)}")


def finish(process: subprocess.Popen, timeout: float = 240.0) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        try:  # whatever the driver left behind (Ray workers after a SIGKILL)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, out


def test_interrupted_driver_resumes_with_one_run_per_trial(tmp_path: Path) -> None:
    study = write_study(tmp_path)

    first = driver(study)
    early = "".join(run_until(first, "epoch 2/"))
    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    code, out = finish(first)
    assert code == 1 and "interrupted" in out, out
    # the study's own view only: no Tune configuration box or results path in between
    assert "Configuration for experiment" not in early + out, early + out
    assert "View detailed results" not in early + out

    second = driver(study)
    run_until(second, "resuming study")
    run_until(second, " done]")  # a trial finished in this run
    second.send_signal(signal.SIGKILL)  # no chance to save anything
    finish(second)

    third = driver(study)
    code, out = finish(third)
    assert code == 0 and "resuming study" in out and "complete" in out, out
    assert "Configuration for experiment" not in out, out

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("interrupted")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'trial'"
    )
    assert len(runs) == 4
    assert len({run.data.tags["samstudy.trial_id"] for run in runs}) == 4
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        assert run.data.tags["samstudy.status"] == "completed"
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'parent'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
