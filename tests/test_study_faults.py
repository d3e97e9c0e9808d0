"""The faults a long study meets: a trial's error shown everywhere, no blind retries, a full or
read-only storage path, and a local Ray that is the study's own.

Real components: the samstudy CLI in a subprocess (its console is what a user sees), Ray Tune
on a local Ray, the trainer, sqlite MLflow, a tmpfs mounted by the test (skipped where it
cannot mount one) and a Ray head started with the ``ray start`` command line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient

ray = pytest.importorskip("ray")
from ray.tune import Callback  # noqa: E402

from samstudy.data.sources import DataNotFoundError  # noqa: E402
from samstudy.study.callbacks import FailureBook  # noqa: E402
from samstudy.study.failures import ERROR, StorageFault, describe, failure_table  # noqa: E402
from samstudy.study.worker import EARLIER_EPOCHS, EpochBatcher  # noqa: E402
from tests.processes import free_port, kill_processes_under  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
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


# -- which errors are retried (units) ------------------------------------------------------------


def test_setup_errors_are_not_retried_and_errors_in_training_are() -> None:
    missing = describe(DataNotFoundError("cifar10 not found under /x"), epoch=None)
    assert (missing.type, missing.retryable) == ("DataNotFoundError", False)
    assert missing.summary == "DataNotFoundError: cifar10 not found under /x"
    assert "Traceback" not in missing.traceback or "DataNotFoundError" in missing.traceback
    assert not describe(ValueError("bad config"), None).retryable
    assert not describe(torch.OutOfMemoryError("CUDA out of memory"), None).retryable
    # once an epoch finished, the same errors keep Tune's retries from the last checkpoint
    assert describe(ValueError("nan in a kernel"), epoch=3).retryable
    assert describe(torch.OutOfMemoryError("fragmentation"), epoch=3).retryable
    assert describe(RuntimeError("NCCL timeout"), None).retryable  # not a set-up error
    full = describe(OSError(errno.ENOSPC, "No space left on device"), epoch=5)
    assert full.storage and not full.retryable
    assert describe(OSError("[Errno 30] Read-only file system: '/x'"), None).storage


def test_a_failing_trial_sends_its_error_with_the_search_metric_last() -> None:
    sent: list[tuple[dict[str, Any], Any]] = []
    batcher = EpochBatcher(lambda metrics, state: sent.append((metrics, state)), batch_s=60.0)
    batcher({"epoch": 1, "test_acc": 0.5, "status": "running"})
    batcher({"epoch": 2, "test_acc": 0.6, "status": "running"})
    assert sent == []  # held: less than batch_s since the start
    batcher.flush()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        batcher.fail(describe(exc, batcher.last_epoch), metric="test_acc")
    (flushed, _), (error, _) = sent
    assert flushed["epoch"] == 2 and [e["epoch"] for e in flushed[EARLIER_EPOCHS]] == [1]
    assert "epoch" not in error  # no epoch: nothing logged twice, ASHA ignores it
    assert error["test_acc"] == 0.6  # Tune refuses a search result without its metric
    record = error[ERROR]
    assert record["type"] == "ValueError" and record["epoch"] == 2 and record["retryable"]
    assert "ValueError: boom" in record["traceback"] and "Traceback" in record["traceback"]


def _trial(trial_id: str = "t1") -> SimpleNamespace:
    """The attributes of a Tune ``Trial`` that the failure book reads."""
    return SimpleNamespace(
        trial_id=trial_id,
        max_failures=3,
        path=f"/storage/study/{trial_id}",
        error_file=None,
        get_pickled_error=lambda: None,
        get_error=lambda: "Failure # 1\nray.exceptions.RayTaskError: worker said no",
    )


def test_the_failure_book_stops_retries_of_what_cannot_succeed() -> None:
    book = FailureBook(max_failures=3)
    trial = _trial()
    book.on_trial_start(trial=trial)
    record = describe(DataNotFoundError("no data"), None).to_dict()
    book.on_trial_result(trial=trial, result={ERROR: record})
    assert trial.max_failures == 0  # Tune fails it at once instead of 3 more attempts
    book.on_trial_error(trial=trial)
    failure = book.final["t1"]
    assert failure.summary == "DataNotFoundError: no data"
    assert failure.error_file == "/storage/study/t1/error.txt"
    book.on_trial_start(trial=trial)  # resumed by a later run: its retries are back
    assert trial.max_failures == 3
    # a trial that sent nothing (its worker died): Tune's own error text
    other = _trial("t2")
    book.on_trial_recover(trial=other)
    assert book.take(other).message == "ray.exceptions.RayTaskError: worker said no"
    # a full storage stops the study at once
    full = describe(OSError(errno.ENOSPC, "No space left on device"), 4).to_dict()
    with pytest.raises(StorageFault, match="No space left"):
        book.on_trial_result(trial=trial, result={ERROR: full})
    table = failure_table([("sgd-s0", failure)])
    assert table.splitlines()[1].startswith("sgd-s0  [not retried] DataNotFoundError: no data")


# -- a trial's error, end to end through the CLI ----------------------------------------------


def _write_study(tmp: Path, name: str, **fields: Any) -> Path:
    data = {
        "name": name,
        "base": {**BASE, **fields.pop("base", {})},
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **fields,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli_env() -> dict[str, str]:
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_missing_data_fails_each_trial_once_with_its_reason_everywhere(tmp_path: Path) -> None:
    missing = tmp_path / "no-cifar"
    study = _write_study(
        tmp_path,
        "nodata",
        base={"data": {"name": "cifar10", "root": str(missing)}},
        seeds=[0, 1],
    )
    # --no-check: the data vanished after `plan` (the pre-flight of `study` would refuse it)
    command = [sys.executable, "-m", "samstudy", "study", str(study), "--num-cpus", "2"]
    command += ["--no-check"]
    done = subprocess.run(
        command, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # the documented code for failed trials
    # each trial started once: no blind retries of an error that cannot go away
    assert len(re.findall(r"\] start ", out)) == 2, out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 2, out
    for line in failed:
        assert "DataNotFoundError: cifar10 not found" in line and "not retried" in line, line
        assert "traceback: " in line and "error.txt" in line, line
    # Ray's tracebacks stay in the log files; the console ends with a table of reasons
    for noise in ("Traceback", "RayTaskError", "Trials did not complete"):
        assert noise not in out, out
    assert "failed trials (2):" in out and "[not retried] DataNotFoundError" in out, out
    assert len(out.splitlines()) < 25, out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nodata")
    runs = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FAILED"
        tags = run.data.tags
        assert tags["samstudy.error"].startswith("DataNotFoundError: cifar10 not found")
        assert str(missing) in tags["samstudy.error"]
        assert tags["samstudy.error_type"] == "DataNotFoundError"
        assert tags["samstudy.retryable"] == "false"
        folder = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
        text = Path(folder).read_text()
        assert "Traceback (most recent call last)" in text and "DataNotFoundError" in text
        assert "load_cifar" in text  # the trial's own frames, not Ray's wrapper

    # ... and in the Parquet runs table, read back with pyarrow
    export = [sys.executable, "-m", "samstudy", "export", "nodata", "--studies-dir", str(tmp_path)]
    export += ["--root", str(tmp_path / "results")]
    done = subprocess.run(export, cwd=ROOT, env=_cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = pq.read_table(tmp_path / "results" / "runs" / "study=nodata")
    errors = runs.column("error").to_pylist()
    assert len(errors) == 2 and all(e.startswith("DataNotFoundError: cifar10") for e in errors)
    assert runs.column("status").to_pylist() == ["failed", "failed"]


# -- a full or read-only storage path ---------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB tmpfs for the study's storage (root and a mount namespace needed)."""
    mount = tmp_path / "storage"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


class BreakStorage(Callback):
    """Fills ``mount`` (or remounts it read-only) once a trial reached ``epoch``. A full disk
    stays full: whatever the study frees later (a finished trial's checkpoints are deleted) is
    taken again at its next event, as other writers to a full disk would take it."""

    def __init__(self, mount: Path, how: str, epoch: int = 3) -> None:
        self.mount, self.how, self.epoch, self.broken = mount, how, epoch, False
        self._fills = 0

    def on_trial_result(self, result: dict, **info: Any) -> None:
        if self.broken:
            self._top_up()
            return
        if result.get("epoch", 0) < self.epoch:
            return
        self.broken = True
        if self.how == "read-only":
            self._remount_read_only()
            return
        self._top_up()

    def on_trial_complete(self, **info: Any) -> None:
        if self.broken:
            self._top_up()

    def _remount_read_only(self) -> None:
        """``mount -o remount,ro``, retried while it says busy: the kernel refuses while a file
        there is open for writing (a checkpoint being written), as CI saw once."""
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(
                ["mount", "-o", "remount,ro", str(self.mount)], capture_output=True, text=True
            )
            if done.returncode == 0:
                return
            if "busy" not in done.stderr or time.monotonic() > deadline:
                raise AssertionError(f"remount read-only failed: {done.stderr.strip()}")
            time.sleep(0.02)

    def _top_up(self) -> None:
        if self.how != "full":
            return
        self._fills += 1
        with contextlib.suppress(OSError), open(self.mount / f"filler{self._fills}", "wb") as f:  # noqa: PTH123
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()

    def repair(self) -> None:
        if self.how == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(self.mount)], check=True)
        else:
            for filler in self.mount.glob("filler*"):
                filler.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_storage_fault_stops_the_study_resumable(small_fs: Path, tmp_path: Path, how: str) -> None:
    from samstudy.study.runner import run_study
    from samstudy.study.spec import study_from_mapping

    if ray.is_initialized():
        ray.shutdown()
    epochs = 8
    spec = study_from_mapping(
        {
            "name": "disk",
            "base": {**BASE, "epochs": epochs, "checkpoint_every": 1},
            "grid": {"seed": [0, 1]},
            "checkpoint_min_s": 0,
            "storage_path": str(small_fs),
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        },
        path=tmp_path / "disk.yaml",
    )
    breaker = BreakStorage(small_fs, how)
    out = io.StringIO()
    result = run_study(spec, callbacks=[breaker], num_cpus=2, out=out)
    assert breaker.broken
    assert result.status == "storage_fault" and result.exit_code == 4, out.getvalue()
    assert str(small_fs) in result.message and "free space" in result.message
    assert "resume" in result.message
    uri = result.tracking_uri
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("disk")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(run.info.status != "RUNNING" for run in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]

    breaker.repair()
    again = run_study(spec, num_cpus=2, out=io.StringIO())
    assert again.status == "complete" and again.exit_code == 0
    trials = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        assert run.info.status == "FINISHED"
    # finished trials keep no checkpoint (checkpoints.keep_final: false, the default)
    assert list(small_fs.rglob("trial.pt")) == []
    assert len(list(small_fs.rglob("result.json"))) == 2


# -- local means local ----------------------------------------------------------------------


def _listening(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on (TCP), from ``ss``."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


class WhereRay(Callback):
    """Records, at the first trial start, the GCS address and what this Ray listens on."""

    def __init__(self) -> None:
        self.gcs = ""
        self.addresses: list[str] = []

    def on_trial_start(self, **info: Any) -> None:
        from ray._private import worker

        if self.gcs:
            return
        self.gcs = ray.get_runtime_context().gcs_address
        for process in worker._global_node.all_processes.values():
            for info_ in process:
                self.addresses += _listening(info_.process.pid)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to see sockets")
def test_a_local_study_starts_its_own_ray_on_the_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samstudy.study.runner import run_study
    from samstudy.study.spec import study_from_mapping

    if ray.is_initialized():
        ray.shutdown()
    # A Ray left by `ray start` on this machine, whose address file a plain ray.init() joins.
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    env = {**_cli_env(), "RAY_TMPDIR": ray_tmp}
    head = [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "1"]
    head += ["--include-dashboard", "false", "--disable-usage-stats"]
    try:
        subprocess.run(head, env=env, capture_output=True, text=True, timeout=120, check=True)
        assert list(Path(ray_tmp).rglob("ray_current_cluster"))
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        spec = study_from_mapping(
            {
                "name": "own",
                "base": {**BASE, "checkpoint_every": 1},
                "checkpoint_min_s": 0,
                "checkpoints": {"keep_final": True},  # the final weights stay
                "storage_path": str(tmp_path / "ray"),
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            },
            path=tmp_path / "own.yaml",
        )
        where = WhereRay()
        started = time.monotonic()
        result = run_study(spec, callbacks=[where], num_cpus=1, out=io.StringIO())
        assert result.status == "complete", time.monotonic() - started
        host, _, gcs_port = where.gcs.rpartition(":")
        assert host == "127.0.0.1" and int(gcs_port) != port, where.gcs
        assert where.addresses
        for address in where.addresses:
            assert address.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]"), address
        kept = sorted(p.parent.name for p in (tmp_path / "ray").rglob("trial.pt"))
        assert kept == ["checkpoint_000001", "checkpoint_000002"]  # keep: 2 of 3 epochs
    finally:
        kill_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- exit codes a pipeline can trust -----------------------------------------------------------


@pytest.mark.slow
def test_study_with_mlflow_away_exits_3_and_export_warns(tmp_path: Path) -> None:
    from samstudy.study.runner import run_study
    from samstudy.study.spec import load_study

    if ray.is_initialized():
        ray.shutdown()
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens: MLflow is down all along
    study = _write_study(tmp_path, "away", base={"epochs": 2})
    spec = load_study(str(study))
    # no pre-flight: it would refuse the store that is down (the point here is a store that
    # goes away during a study)
    result = run_study(
        spec, tracking_uri=away, num_cpus=1, flush_timeout_s=2, out=io.StringIO(), preflight=False
    )
    assert result.status == "complete" and result.tracking_pending > 0
    assert result.exit_code == 3  # finished, but MLflow is incomplete: not 0
    spool = tmp_path / "ray" / "away" / "samstudy_mlflow_spool.json"
    assert spool.is_file()

    export = [sys.executable, "-m", "samstudy", "export", "away", "--studies-dir", str(tmp_path)]
    export += ["--root", str(tmp_path / "results")]
    done = subprocess.run(
        export, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120
    )
    assert f"{result.tracking_pending} tracking operations of study away" in done.stderr
    assert "samstudy study away" in done.stderr
