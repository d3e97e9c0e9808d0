"""The MLflow spool's cap, with real operations: a tracker whose MLflow server is not there
spools what it could not send; over the cap it keeps every status and each trial's earliest
epochs, says loudly what it did not keep, and a real sqlite store replays the rest."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here

import pytest
from mlflow import MlflowClient

from samstudy import tags
from samstudy.analysis.synthetic import sqlite_store
from samstudy.devstores import free_port
from samstudy.settings import (
    DEFAULT_SPOOL_MAX_MB,
    SPOOL_MAX_ENV,
    Tracking,
    TrackingError,
    spool_max_mb,
)
from samstudy.study.outbox import DEFAULT_SPOOL_MAX_MB as OUTBOX_DEFAULT
from samstudy.study.tracking import StudyTracker

EPOCHS = 30
METRICS = 40  # values per epoch: ~1 kB per epoch record in the spool


def trial(index: int) -> dict:
    return {
        "trial_id": f"t{index}",
        "name": f"sgd-mlp-s{index}",
        "config": {"optimizer": {"name": "sgd", "lr": 0.05}, "model": {"name": "mlp"}},
        "overrides": {"seed": index},
    }


def track_offline(tmp: Path, cap_mb: float | None, monkeypatch: pytest.MonkeyPatch) -> StudyTracker:
    """A study of two trials (one failing) tracked against a server that is not there."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: nobody listens
    tracker = StudyTracker(
        f"http://127.0.0.1:{free_port()}",
        "capped",
        spool_path=tmp / "spool.json",
        max_backoff_s=0.5,
        spool_max_mb=cap_mb,
    )
    tracker.start()
    trials = [trial(0), trial(1)]
    for t in trials:
        tracker.trial_started(t)
    for epoch in range(1, EPOCHS + 1):  # interleaved, as trials running side by side report
        for t in trials:
            values = {f"metric_{k:02d}": epoch + k / 100 for k in range(METRICS - 1)}
            tracker.log_epoch(t, {**values, "epoch": float(epoch)}, wall_time=1e9 + epoch)
    tracker.set_status(trials[0], "completed")
    tracker.set_status(trials[1], "failed", tags={tags.ERROR: "ValueError: boom"})
    return tracker


def replay(tmp: Path, spool: Path) -> tuple[str, dict]:
    """Send the spool to a real sqlite store, as the next `samstudy study` does."""
    uri = sqlite_store(tmp / "mlflow.db")
    tracker = StudyTracker(uri, "capped", spool_path=spool)
    tracker.start(announce=False)
    assert tracker.finish(None, timeout=120) == 0
    assert not spool.exists()  # everything reached MLflow: the spool is gone
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("capped")
    runs = client.search_runs([exp.experiment_id], "tags.`samstudy.role` = 'trial'")
    return uri, {r.data.tags[tags.TRIAL_ID]: r for r in runs}


def test_spool_over_its_cap_keeps_statuses_and_earliest_epochs_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cap_mb = 0.02  # 20 kB: about a third of the 60 epochs
    tracker = track_offline(tmp_path, cap_mb, monkeypatch)
    queued = tracker.pending
    assert queued == 1 + 2 + 2 * EPOCHS + 2  # study mark, 2 starts, epochs, 2 statuses
    with caplog.at_level(logging.WARNING):
        left = tracker.finish("complete", timeout=1.0)
    assert left == queued + 1  # + the study's end: nothing reached MLflow, all counted pending

    spool = tmp_path / "spool.json"
    assert spool.stat().st_size <= cap_mb * 1_000_000
    data = json.loads(spool.read_text())
    ops = data["ops"]
    kinds = [op["op"] for op in ops]
    # every study and status operation is kept
    assert kinds.count("study") == 1 and kinds.count("study_end") == 1
    assert kinds.count("status") == 4
    assert sorted(data["trials"]) == ["t0", "t1"]
    # each trial keeps a gap-free prefix of its epochs; the rest is accounted for
    cut = tracker.outbox.not_spooled
    assert cut, "the cap was not reached"
    kept_epochs: dict[str, list[int]] = {"t0": [], "t1": []}
    for op in ops:
        if op["op"] == "metrics":
            kept_epochs[op["trial_id"]].append(op["epoch"])
    for trial_id, epochs in kept_epochs.items():
        assert epochs == list(range(1, len(epochs) + 1)), trial_id
        assert 0 < len(epochs) < EPOCHS
        lost = sorted(op.epoch for op in cut if op.trial_id == trial_id)
        assert lost == list(range(len(epochs) + 1, EPOCHS + 1))
    assert len(cut) + sum(map(len, kept_epochs.values())) == 2 * EPOCHS
    # ... and said loudly: a logged error with the counts
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert (
        f"NOT KEPT: {len(cut)} epochs ({len(cut) * METRICS} metric values) of 2 trials"
        in (errors[0])
    )
    assert "t0, t1" in errors[0] and "0.02 MB" in errors[0]
    spooled = [r.getMessage() for r in caplog.records if "operations spooled" in r.getMessage()]
    assert spooled and f"{left - len(cut)} tracking operations spooled" in spooled[0]

    # The next run sends the spool: the kept epochs, the statuses and the cut, in MLflow.
    uri, runs = replay(tmp_path, spool)
    client = MlflowClient(uri)
    for trial_id, epochs in kept_epochs.items():
        run = runs[trial_id]
        history = client.get_metric_history(run.info.run_id, "metric_05")
        assert sorted(m.step for m in history) == epochs
        first_lost = len(epochs) + 1
        assert run.data.tags[tags.SPOOL_CUT].startswith(
            f"epochs {first_lost}-{EPOCHS} ({EPOCHS - len(epochs)}) not sent"
        )
    assert runs["t0"].data.tags[tags.STATUS] == "completed"
    assert runs["t1"].data.tags[tags.STATUS] == "failed"
    assert runs["t1"].data.tags[tags.ERROR] == "ValueError: boom"
    assert runs["t1"].info.status == "FAILED"


def test_spool_under_its_cap_keeps_everything_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(SPOOL_MAX_ENV, "1")  # 1 MB: the tracker takes it from the environment
    tracker = track_offline(tmp_path, None, monkeypatch)
    assert tracker.outbox.spool_max_mb == 1.0
    with caplog.at_level(logging.WARNING):
        left = tracker.finish("complete", timeout=1.0)
    assert not tracker.outbox.not_spooled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    data = json.loads((tmp_path / "spool.json").read_text())
    assert len(data["ops"]) == left
    _, runs = replay(tmp_path, tmp_path / "spool.json")
    assert set(runs) == {"t0", "t1"}
    assert all(tags.SPOOL_CUT not in r.data.tags for r in runs.values())
    assert runs["t1"].data.metrics["epoch"] == EPOCHS


def test_spool_cap_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPOOL_MAX_ENV, raising=False)
    assert spool_max_mb() == DEFAULT_SPOOL_MAX_MB == OUTBOX_DEFAULT == 200
    monkeypatch.setenv(SPOOL_MAX_ENV, "50")
    assert spool_max_mb() == 50 and spool_max_mb(Tracking()) == 50
    assert spool_max_mb(Tracking(spool_max_mb=5)) == 5  # the study file wins
    for bad in ("0", "-3", "lots", "inf"):
        monkeypatch.setenv(SPOOL_MAX_ENV, bad)
        with pytest.raises(TrackingError, match=SPOOL_MAX_ENV):
            spool_max_mb()
    with pytest.raises(ValueError, match="spool_max_mb"):
        Tracking(spool_max_mb=0)
