"""``samstudy status`` and ``samstudy stop`` from a second process while a study runs (the driver
in its own process, as a user runs it), then a resume to completion with every epoch exactly
once per MLflow run. Real Ray, real sqlite MLflow, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from samstudy.study.control import request_stop
from samstudy.study.state import ExperimentFiles
from samstudy.study.worker import CHECKPOINT_FILE
from tests.studies import digits_sam_base

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 200


def samstudy(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [sys.executable, "-m", "samstudy", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_status_and_stop_from_another_shell_then_resume(tmp_path: Path) -> None:
    study = {
        "name": "ctl",
        # no checkpoints but the one each trial saves when stopped
        "base": digits_sam_base(EPOCHS, checkpoint_every=0),
        "seeds": [0, 1],
        "checkpoint_min_s": 0,
        "storage_path": str(tmp_path / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "ctl.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "samstudy", "study", str(path), "--num-cpus", "2",
         "--progress-interval", "0"],
        cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert driver.stdout is not None
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until two trials are a few epochs in
            line = driver.stdout.readline()
            seen.append(line)
            at = re.search(rf"epoch (\d+)/{EPOCHS}", line)
            if line.startswith("[") and at and int(at.group(1)) >= 4:
                break
        else:
            raise AssertionError("".join(seen))
        time.sleep(2)  # the metrics reach MLflow (the writer thread)

        status = samstudy("status", str(path), "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["total"] == 2 and data["counts"].get("running", 0) >= 1, data
        running = [t for t in data["trials"] if t["status"] == "running"]
        assert all(t["epochs"] == EPOCHS and t["node"] for t in running), running
        assert any((t["epoch"] or 0) >= 1 and t["epoch_time"] for t in running), running
        assert data["eta_s"] is not None and data["eta_s"] > 0
        text = samstudy("status", str(path)).stdout
        assert text.startswith("study ctl (running):") and "ETA" in text, text
        assert f"/{EPOCHS}" in text and " on " in text, text

        # two stops in a row (as two shells would): the second one is told
        files = ExperimentFiles(str(tmp_path / "ray" / "ctl"))
        assert request_stop(files).startswith("stop requested: the driver on ")
        assert "already requested" in request_stop(files)
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, "".join(seen) + out
    assert "stopped by `samstudy stop`" in out, out
    assert "Traceback" not in out, out
    # each trial that was running saved a checkpoint of the last epoch it reported
    saved = 0
    for folder in (tmp_path / "ray" / "ctl").glob("*/result.json"):
        last = json.loads(folder.read_text().splitlines()[-1])
        if last.get("status") != "running":
            continue
        checkpoints = sorted(folder.parent.glob("checkpoint_*"))
        assert checkpoints, f"{folder.parent.name}: stopped without a checkpoint"
        # (one more may have been written as the driver stopped, its result not processed)
        epochs = [torch.load(c / CHECKPOINT_FILE, weights_only=True)["epoch"] for c in checkpoints]
        assert last["epoch"] in epochs, (epochs, last["epoch"])
        saved += 1
    assert saved >= 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctl")
    runs = client.search_runs([experiment.experiment_id])
    assert all(run.info.status != "RUNNING" for run in runs), [r.info.status for r in runs]
    assert all(run.info.status != "FAILED" for run in runs)
    stop = samstudy("stop", str(path))  # the CLI, once the driver is gone
    assert stop.returncode == 0 and "no driver is running" in stop.stdout, stop.stdout

    before = {
        r.data.tags["samstudy.trial_id"]: r.info.run_id
        for r in runs
        if "samstudy.trial_id" in r.data.tags
    }
    # where it runs is not what it computes: with another data folder, loader workers and
    # checkpoint cadence the same trials resume (an identity field would make other trials, refused)
    # (not threads: two trials of two threads on two cores spin-wait each other for minutes)
    elsewhere = f"data.root={tmp_path / 'elsewhere'}"
    moved = ["--set", elsewhere, "--set", "data.num_workers=0", "--set", "checkpoint_every=3"]
    again = samstudy("study", str(path), "--num-cpus", "2", *moved, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming study ctl: 2 trials" in again.stdout, again.stdout
    trials = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    assert {r.data.tags["samstudy.trial_id"]: r.info.run_id for r in trials} == before
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'parent'")
    assert json.loads(parent.data.tags["samstudy.set"]) == [m for m in moved if m != "--set"]
    refused = samstudy("study", str(path), "--set", "optimizer.rho=0.1")
    assert refused.returncode != 0 and "--set" in refused.stdout + refused.stderr
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))
    final = json.loads(samstudy("status", str(path), "--json").stdout)
    assert final["counts"] == {"completed": 2} and final["eta_s"] == 0
