"""Interrupting the driver: ``samstudy study`` in a subprocess, stopped by SIGINT and by SIGKILL,
then run again until the study completes with exactly one MLflow run per trial; and a study
started by the previous version of samstudy, resumed by this one."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from tests.studies import digits_sam_base

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


def write_study(tmp: Path) -> Path:
    study = {
        "name": "interrupted",
        "base": digits_sam_base(EPOCHS, checkpoint_every=1),
        "grid": {"seed": [0, 1, 2, 3]},
        "checkpoint_min_s": 0,  # every epoch's checkpoint kept: the rerun resumes mid-trial
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    path = tmp / "interrupted.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def driver(study: Path, package: Path | None = None, prelude: str = "") -> subprocess.Popen:
    """``samstudy study`` on ``study``; ``package``: a folder with another samstudy to run;
    ``prelude``: Python the driver runs first (a fault to inject)."""
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if package is not None:  # first on the path of the driver and of its Ray workers
        env["PYTHONPATH"] = str(package)
    entry = ["-c", f"{prelude}\nimport runpy; runpy.run_module('samstudy', run_name='__main__')"]
    command = [sys.executable, *(entry if prelude else ["-m", "samstudy"])]
    command += ["study", str(study), "--num-cpus", "2"]
    command += ["--progress-interval", "0"]
    # Its own session: after a SIGKILL the test can still reap the Ray processes it started.
    return subprocess.Popen(
        command,
        cwd=package or ROOT,
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
    assert code == 130 and "interrupted" in out, out  # the documented code of an interruption
    # the study's own view only: no Tune configuration box or results path in between
    assert "Configuration for experiment" not in early + out, early + out
    assert "View detailed results" not in early + out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("interrupted")
    # MLflow tells the truth: nothing is left RUNNING; the cut trials say `interrupted`
    stopped = client.search_runs([experiment.experiment_id])
    assert stopped and all(run.info.status != "RUNNING" for run in stopped), [
        (run.info.run_name, run.info.status) for run in stopped
    ]
    cut = [r for r in stopped if r.data.tags.get("samstudy.status") == "interrupted"]
    assert cut and all(run.info.status == "KILLED" for run in cut)

    second = driver(study)
    resumed = "".join(run_until(second, "resuming study"))
    resumed += "".join(run_until(second, " done]"))  # a trial finished in this run
    # a normal resume is quiet: no Ray traceback, no per-trial warnings of Tune
    for noise in ("Traceback", "FileNotFoundError", "Failed to fetch metrics"):
        assert noise not in resumed, resumed
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert running  # the resumed trials are running again (and the parent)
    second.send_signal(signal.SIGKILL)  # no chance to save anything
    finish(second)

    third = driver(study)
    code, out = finish(third)
    assert code == 0 and "resuming study" in out and "complete" in out, out
    assert "Configuration for experiment" not in out, out
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


# -- a study started by the previous version -------------------------------------------------

# The last commit before the study package was split into worker / callbacks / state /
# searchspace / runner and the tracker into store / outbox: its experiments pickled
# `samstudy.study.runner._Dispatch`, `_DropEarlierEpochs` and `_trial_dirname`.
PREVIOUS = "4cb92f8"


def previous_version(tmp: Path) -> Path:
    """The samstudy package of :data:`PREVIOUS` (``git archive``: the checkout is untouched)."""
    if shutil.which("git") is None:
        pytest.skip("no git to fetch the previous version")
    probe = subprocess.run(
        ["git", "cat-file", "-e", f"{PREVIOUS}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"commit {PREVIOUS} is not in this clone")
    archive = subprocess.run(
        ["git", "archive", PREVIOUS, "samstudy", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    folder = tmp / "previous"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


# Dies the moment Tune has taken a trial's second checkpoint: with `keep: 1` that is when Tune
# deletes the first, which its state in the storage still names until its next sync.
DIE_AFTER_A_DELETION = """
import collections, os
from ray.tune.experiment import trial as trial_module
taken = collections.Counter()
register = trial_module.Trial.on_checkpoint
def on_checkpoint(self, checkpoint_result):
    register(self, checkpoint_result)
    taken[self.trial_id] += 1
    if taken[self.trial_id] == 2:
        os._exit(137)
trial_module.Trial.on_checkpoint = on_checkpoint
"""


def killed_after_a_deletion(tmp: Path) -> Path:
    """A one-trial study (``keep: 1``) whose driver died as DIE_AFTER_A_DELETION says."""
    study = write_study(tmp)
    spec = yaml.safe_load(study.read_text())
    spec["grid"] = {"seed": [0]}
    spec["checkpoints"] = {"keep": 1}
    study.write_text(yaml.safe_dump(spec))
    code, out = finish(driver(study, prelude=DIE_AFTER_A_DELETION))
    assert code == 137, out
    return study


def test_a_driver_killed_right_after_tune_deleted_a_checkpoint_resumes(tmp_path: Path) -> None:
    """Tune deletes a running trial's older checkpoint when it takes a newer one and saves its
    state (which names the older one) only later; a driver killed in between once left a trial
    that no resume could restore (fresh-clone CI: "does not exist on storage anymore")."""
    study = killed_after_a_deletion(tmp_path)
    trial = next((tmp_path / "ray" / "interrupted").glob("*-s0"))
    assert (trial / "checkpoint_000000").is_dir()  # held: the saved state still names it

    code, out = finish(driver(study))
    assert code == 0 and "resuming study" in out and "complete" in out, out
    for noise in ("does not exist on storage", "FileNotFoundError", "retry"):
        assert noise not in out, out
    assert not list(trial.glob("checkpoint_*"))  # all pruned once the trial finished
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("interrupted")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'trial'"
    )
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


def test_the_resume_removes_a_checkpoint_that_the_saved_state_no_longer_names(
    tmp_path: Path,
) -> None:
    """A deletion held when the driver died, with Tune's state saved after it (so naming only
    the newer checkpoint), leaves the older one behind: the resume removes it before its trials
    start. Tune's own state, edited as that later save would have written it."""
    study = killed_after_a_deletion(tmp_path)
    exp = tmp_path / "ray" / "interrupted"
    trial = next(exp.glob("*-s0"))
    old, new = (trial / f"checkpoint_00000{i}" for i in (0, 1))
    assert old.is_dir() and new.is_dir()
    (state,) = exp.glob("experiment_state-*.json")
    text = state.read_text()
    named = [bytes.fromhex(h) for h in re.findall(r"[0-9a-f]{40,}", text) if len(h) % 2 == 0]
    assert any(str(old).encode() in blob for blob in named)  # the held one, as Tune wrote it
    for a, b in ((old.name, new.name), (old.name.encode().hex(), new.name.encode().hex())):
        text = text.replace(a, b)  # same length: the pickles stay whole
    state.write_text(text)

    code, out = finish(driver(study))
    assert code == 0 and "complete" in out, out
    assert "removed 1 checkpoint(s) that the stopped driver left" in out, out


def test_a_trial_whose_checkpoint_is_gone_fails_with_tunes_reason(tmp_path: Path) -> None:
    """A checkpoint lost from the storage (deleted by hand) makes each restore fail; the study
    says why (Tune's error from the driver's own copy: the storage's comes a sync later)."""
    study = killed_after_a_deletion(tmp_path)
    for folder in (tmp_path / "ray" / "interrupted").glob("*-s0/checkpoint_*"):
        shutil.rmtree(folder)

    code, out = finish(driver(study))
    assert code == 1 and "failed trials (1)" in out, out
    retries = [line for line in out.splitlines() if line.startswith("[") and "s0  " in line]
    retries = [line for line in retries if " retry " in line or " FAILED " in line]
    assert len(retries) == 4, out  # Tune's max_failures: 3 retries, then it fails
    for line in retries:
        assert "Could not recover from checkpoint" in line and "unknown error" not in line, out


@pytest.mark.parametrize("kind", ["grid", "search"])
def test_study_of_the_previous_version_resumes(tmp_path: Path, kind: str) -> None:
    """Started by the previous version and interrupted after a trial ended, a study resumes
    with this one (Tune unpickles the old callbacks by their old paths, and a search study's
    fingerprint was computed from an untyped optimizer) and ends with every epoch of every
    trial exactly once in MLflow."""
    old = previous_version(tmp_path)
    base: dict[str, Any] = {
        # An upgrade keeps the checkout, so both versions take relative data paths from the same
        # project root; here the previous one runs from another folder, so the data root (which
        # a search trial's checkpoint records) is absolute.
        "data": {"name": "digits", "root": str(tmp_path / "data")},
        "model": {"name": "mlp"},
        # ints where the typed optimizer has floats: the previous fingerprint kept them
        "optimizer": {"name": "same", "scales": [1, 0, 0, 0], "lr": 0.05, "rho": 0.05},
        "epochs": EPOCHS,
        "threads": 1,
        "device": "cpu",
        "checkpoint_every": 1,
    }
    study: dict[str, Any] = {
        "name": "previous",
        "base": base,
        "checkpoint_min_s": 0,
        "storage_path": str(tmp_path / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    if kind == "grid":
        study["grid"] = {"seed": [0, 1, 2, 3]}
    else:
        rho = {"type": "float", "low": 0.01, "high": 0.2}
        study["search"] = {"algorithm": "random", "metric": "test_acc", "mode": "max"}
        study["search"].update(num_samples=4, seed=0, params={"optimizer.rho": rho})
    path = tmp_path / "previous.yaml"
    path.write_text(yaml.safe_dump(study))

    first = driver(path, package=old)
    run_until(first, " done]")  # a trial finished, the others have not
    first.send_signal(signal.SIGINT)
    code, out = finish(first)
    assert code == 1 and "interrupted" in out, out
    pickled = (tmp_path / "ray" / "previous" / "tuner.pkl").read_bytes()
    assert b"samstudy.study.runner" in pickled and b"_Dispatch" in pickled

    code, out = finish(driver(path))
    assert code == 0 and "resuming study previous" in out and "complete" in out, out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("previous")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'trial'"
    )
    assert len({run.data.tags["samstudy.trial_id"] for run in runs}) == len(runs) == 4
    for run in runs:
        for key in ("epoch", "train_loss", "test_acc"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert run.data.tags["samstudy.status"] == "completed"
        assert run.info.status == "FINISHED"
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'parent'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
