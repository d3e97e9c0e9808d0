"""StudyTracker against a real sqlite MLflow store: layout, idempotence, buffering and spool."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from samstudy.settings import TrackingError, check_tracking_uri
from samstudy.study.callbacks import trial_metrics
from samstudy.study.operations import TrialStatus
from samstudy.study.tracking import StudyTracker

TRIAL = {
    "trial_id": "abc123def456",
    "name": "sam-rho0.1-mlp-n0.4-s1",
    "config": {"optimizer": {"name": "sam", "rho": 0.1, "scales": [1, 0, 0, 0]}, "seed": 1},
    "overrides": {"optimizer.rho": 0.1},
}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised MLflow sqlite file: creating one runs every migration (seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path: Path, empty_db: Path) -> str:
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(uri: str, study: str = "demo", role: str = "trial") -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`samstudy.role` = '{role}'"
    )


def _history(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _log(tracker: StudyTracker, epochs: range) -> None:
    for epoch in epochs:
        # a Tune result, reduced to its trial metrics as the tracking callback does
        result = {"epoch": epoch, "loss": 1.0 / epoch, "status": "running", "pid": 7}
        tracker.log_epoch(TRIAL, trial_metrics(result))


def test_layout_params_tags_and_steps(uri: str) -> None:
    tracker = StudyTracker(uri, "demo", study_sha256="f" * 64, description="a demo")
    tracker.start()
    tracker.trial_started(TRIAL)
    _log(tracker, range(1, 4))
    tracker.set_status(TRIAL, "diverged")
    assert tracker.finish("complete", timeout=30) == 0

    (parent,) = _runs(uri, role="parent")
    assert parent.info.run_name == "demo" and parent.info.status == "FINISHED"
    assert parent.data.tags["samstudy.status"] == "complete"
    assert parent.data.tags["mlflow.note.content"] == "a demo"
    (run,) = _runs(uri)
    assert run.info.run_name == TRIAL["name"]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["samstudy.trial_id"] == TRIAL["trial_id"]
    assert tags["samstudy.study"] == "demo"
    assert tags["samstudy.study_sha256"] == "f" * 64
    assert tags["samstudy.status"] == "diverged"
    assert tags["samstudy.version"] and tags["samstudy.git_commit"]
    assert run.data.params == {
        "optimizer.name": "sam",
        "optimizer.rho": "0.1",
        "optimizer.scales": "[1, 0, 0, 0]",
        "seed": "1",
    }
    assert _history(uri, run.info.run_id) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert "pid" not in run.data.metrics  # Tune bookkeeping is not a trial metric


def test_second_tracker_reuses_run_and_skips_logged_epochs(uri: str) -> None:
    first = StudyTracker(uri, "demo")
    first.start()
    _log(first, range(1, 4))
    first.finish("interrupted", timeout=30)
    (parent,) = _runs(uri, role="parent")
    assert parent.info.status == "KILLED"

    # A resumed study in a new process: the trial re-reports from its epoch-2 checkpoint.
    second = StudyTracker(uri, "demo")
    second.start()
    second.trial_started(TRIAL)
    _log(second, range(3, 6))
    second.set_status(TRIAL, "completed")
    second.finish("complete", timeout=30)

    (run,) = _runs(uri)  # still one run for the trial, and one parent
    assert len(_runs(uri, role="parent")) == 1
    assert [step for step, _ in _history(uri, run.info.run_id)] == [1, 2, 3, 4, 5]
    assert _runs(uri, role="parent")[0].info.status == "FINISHED"


def test_failed_then_retried_status(uri: str) -> None:
    tracker = StudyTracker(uri, "demo")
    tracker.start()
    tracker.set_status(TRIAL, "failed")
    tracker.flush(30)
    assert _runs(uri)[0].info.status == "FAILED"
    tracker.set_status(TRIAL, "running")
    tracker.flush(30)
    run = _runs(uri)[0]
    assert run.info.status == "RUNNING" and run.data.tags["samstudy.status"] == "running"
    tracker.finish(None, timeout=30)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_store_buffers_then_spool_replays(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spool = tmp_path / "spool.json"
    dead = StudyTracker(
        f"http://127.0.0.1:{_closed_port()}", "demo", spool_path=spool, max_backoff_s=0.2
    )
    dead.start()
    dead.trial_started(TRIAL)
    _log(dead, range(1, 4))
    dead.set_status(TRIAL, "completed")
    left = dead.finish("complete", timeout=2)
    assert left >= 5 and not dead.online and spool.is_file()

    # The next run sends the spool first (here to a store that works) and removes it.
    replay = StudyTracker(uri, "demo", spool_path=spool)
    replay.start(announce=False)
    assert replay.finish(None, timeout=30) == 0
    assert not spool.exists()
    (run,) = _runs(uri)
    assert run.info.run_name == TRIAL["name"] and run.info.status == "FINISHED"
    assert [s for s, _ in _history(uri, run.info.run_id)] == [1, 2, 3]
    assert _runs(uri, role="parent")[0].data.tags["samstudy.status"] == "complete"


def test_purge_soft_deletes_earlier_runs(uri: str) -> None:
    old = StudyTracker(uri, "demo")
    old.start()
    _log(old, range(1, 3))
    old.finish("complete", timeout=30)
    old_run = _runs(uri)[0].info.run_id

    fresh = StudyTracker(uri, "demo")
    fresh.start(purge=True)
    _log(fresh, range(1, 2))
    fresh.finish("complete", timeout=30)
    (run,) = _runs(uri)
    assert run.info.run_id != old_run
    assert MlflowClient(uri).get_run(old_run).info.lifecycle_stage == "deleted"
    assert [s for s, _ in _history(uri, run.info.run_id)] == [1]


def test_tracking_uri_rules(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="file store"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    with pytest.raises(TrackingError, match="file store"):
        check_tracking_uri("file:///tmp/mlruns")
    assert check_tracking_uri("sqlite:///x.db", root=tmp_path) == f"sqlite:///{tmp_path}/x.db"
    assert check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_trial_metrics_keeps_numbers_only() -> None:
    result = {"epoch": 3, "test_acc": 0.9, "status": "running", "done": False, "pid": 1}
    result.update({"training_iteration": 3, "node_id": "abc", "config": {"a": 1}})
    assert trial_metrics(result) == {"epoch": 3.0, "test_acc": 0.9}


def test_queued_epochs_are_written_in_few_batches(uri: str) -> None:
    """Epochs queued together (a worker's batch) go out in one log_batch per ~1000 metrics,
    each epoch exactly once, repeats skipped."""
    tracker = StudyTracker(uri, "demo")
    _log(tracker, range(1, 121))  # queued before the writer starts: one run of 120 epochs
    _log(tracker, range(100, 131))  # a resumed trial re-reporting epochs 100..120
    client = tracker.store.client
    calls: list[int] = []
    log_batch = client.log_batch

    def counting_log_batch(run_id: str, metrics=(), **kwargs) -> None:  # noqa: ANN001
        if metrics:
            calls.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kwargs)

    client.log_batch = counting_log_batch  # an observer in front of the real client
    tracker.start()
    assert tracker.finish("complete", timeout=60) == 0
    (run,) = _runs(uri)
    assert _history(uri, run.info.run_id) == [(e, 1.0 / e) for e in range(1, 131)]
    # 2 metrics per epoch (loss, epoch): 120 + 10 new epochs in a handful of calls, not 130
    assert sum(calls) == 2 * 130
    assert len(calls) <= 4, calls
    assert all(n <= 1000 for n in calls)


def test_a_trials_status_tag_comes_with_its_last_epochs(uri: str) -> None:
    """Tags, 600 epochs and the end, queued together: two groups of at most MLflow's 1000
    entries per log_batch (so it splits none); the tags ride on a group's call, whose metrics
    MLflow writes first, so no run says ``completed`` while it misses epochs."""
    tracker = StudyTracker(uri, "demo")
    tracker.trial_started(TRIAL)
    tracker.set_tags(TRIAL, {"samstudy.node": "n1"})
    _log(tracker, range(1, 601))
    tracker.set_status(TRIAL, "completed")
    client = tracker.store.client
    calls: list[tuple[int, list[str]]] = []
    log_batch = client.log_batch

    def observed(run_id: str, metrics=(), params=(), tags=(), **kwargs) -> None:  # noqa: ANN001
        calls.append((len(metrics), sorted(t.key for t in tags)))
        log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    client.log_batch = observed
    tracker.start()
    assert tracker.finish("complete", timeout=60) == 0
    # 2 metrics per epoch: 1200 and 2 tags in two calls of at most 1000 entries each
    with_epochs = [call for call in calls if call[0]]  # not the params', nor the study's
    assert with_epochs == [(998, ["samstudy.node"]), (202, ["samstudy.status"])]
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["samstudy.status"] == "completed"
    assert len(_history(uri, run.info.run_id)) == 600


def test_refused_epoch_in_a_batch_drops_only_itself(uri: str) -> None:
    """MLflow refusing one epoch of a queued group (tags, epochs, status): the rest is still
    written, once."""
    tracker = StudyTracker(uri, "demo")
    tracker.set_tags(TRIAL, {"samstudy.node": "n1"})
    for epoch in range(1, 6):
        metrics = {"epoch": epoch, "loss": 1.0 / epoch}
        if epoch == 3:
            metrics["bad name!"] = 1.0  # an invalid metric name: a permanent refusal
        tracker.log_epoch(TRIAL, metrics)
    tracker.set_status(TRIAL, "completed")
    tracker.start()
    assert tracker.finish("complete", timeout=60) == 0
    (run,) = _runs(uri)
    assert [step for step, _ in _history(uri, run.info.run_id)] == [1, 2, 4, 5]
    assert [op.epoch for op, _ in tracker.dropped] == [3]
    assert run.info.status == "FINISHED" and run.data.tags["samstudy.status"] == "completed"
    assert run.data.tags["samstudy.node"] == "n1"


def test_variant_tags_and_set_tag_on_every_start(uri: str) -> None:
    trial = {**TRIAL, "variant": "sam-rho0.1-mlp-n0.4", "variant_id": "0123456789ab"}
    first = StudyTracker(uri, "demo", overrides=["epochs=3", "optimizer.rho=0.1"])
    first.start()
    first.trial_started(trial)
    first.finish("interrupted", timeout=30)
    (run,) = _runs(uri)
    assert run.data.tags["samstudy.variant"] == "sam-rho0.1-mlp-n0.4"
    assert run.data.tags["samstudy.variant_id"] == "0123456789ab"
    (parent,) = _runs(uri, role="parent")
    assert json.loads(parent.data.tags["samstudy.set"]) == ["epochs=3", "optimizer.rho=0.1"]

    again = StudyTracker(uri, "demo", overrides=["epochs=4"])  # the next start's --set
    again.start()
    again.finish("complete", timeout=30)
    (parent,) = _runs(uri, role="parent")
    assert json.loads(parent.data.tags["samstudy.set"]) == ["epochs=4"]

    plain = StudyTracker(uri, "other")  # no --set: no tag; a trial without a variant: none
    plain.start()
    plain.trial_started(TRIAL)
    plain.finish("complete", timeout=30)
    (parent,) = _runs(uri, "other", role="parent")
    assert "samstudy.set" not in parent.data.tags
    (run,) = _runs(uri, "other")
    assert "samstudy.variant" not in run.data.tags


def test_spool_of_the_previous_version_replays(tmp_path: Path, uri: str) -> None:
    """A spool written by an earlier version (plain dicts with an ``op`` key, trials without a
    variant) is sent by the next run; an operation this version does not know is skipped."""
    old = StudyTracker(uri, "demo")  # a run that the spooled --fresh purges
    old.start()
    _log(old, range(1, 3))
    old.finish("complete", timeout=30)
    (old_run,) = _runs(uri)

    ts = 1_700_000_000_000
    ops = [
        {"op": "purge"},
        {"op": "study"},
        {"op": "status", "trial_id": TRIAL["trial_id"], "status": "running"},
        {"op": "tags", "trial_id": TRIAL["trial_id"], "tags": {"samstudy.node_id": "n1"}},
        *(
            {
                "op": "metrics",
                "trial_id": TRIAL["trial_id"],
                "epoch": e,
                "metrics": {"epoch": float(e), "loss": 1.0 / e},
                "ts": ts + e,
            }
            for e in (1, 2)
        ),
        {"op": "from_a_newer_version", "trial_id": TRIAL["trial_id"]},
        {
            "op": "status",
            "trial_id": TRIAL["trial_id"],
            "status": "completed",
            "ts": ts + 3,
            "tags": {"samstudy.retried": "true"},
        },
        {"op": "study_end", "status": "complete", "ts": ts + 4},
    ]
    spool = tmp_path / "spool.json"
    spool.write_text(json.dumps({"trials": {TRIAL["trial_id"]: TRIAL}, "ops": ops}))

    replay = StudyTracker(uri, "demo", spool_path=spool)
    replay.start(announce=False)
    assert replay.finish(None, timeout=30) == 0
    assert not spool.exists()
    assert MlflowClient(uri).get_run(old_run.info.run_id).info.lifecycle_stage == "deleted"
    (run,) = _runs(uri)
    assert run.info.run_id != old_run.info.run_id
    assert run.info.run_name == TRIAL["name"] and run.info.status == "FINISHED"
    assert run.info.end_time == ts + 3
    assert run.data.params["optimizer.rho"] == "0.1"
    tags = run.data.tags
    assert tags["samstudy.status"] == "completed" and tags["samstudy.node_id"] == "n1"
    assert tags["samstudy.retried"] == "true"
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [
        (1, 1.0, ts + 1),
        (2, 0.5, ts + 2),
    ]
    (parent,) = _runs(uri, role="parent")
    assert parent.data.tags["samstudy.status"] == "complete"
    assert parent.info.status == "FINISHED" and parent.info.end_time == ts + 4


REQUESTS = ("search_runs", "create_run", "log_batch", "update_run", "set_terminated", "log_text")


def _count_requests(tracker: StudyTracker) -> list[str]:
    """Observers in front of the real client's request methods: the names, in call order."""
    client = tracker.store.client
    calls: list[str] = []
    for name in REQUESTS:
        method = getattr(client, name)

        def observed(*args, _name=name, _method=method, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(_name)
            return _method(*args, **kwargs)

        setattr(client, name, observed)
    return calls


def test_a_short_trial_costs_four_store_requests(uri: str) -> None:
    """Each request is 2-15 ms of the driver's CPU, taken from the trials on a small machine:
    a new trial's run is made with its tags and params in two, not looked up first; its result
    (node tags and epochs) and its end, which Tune reports ~15 ms apart, in two more."""
    tracker = StudyTracker(uri, "demo")
    tracker.start()
    assert tracker.flush(30)
    calls = _count_requests(tracker)
    tracker.trial_started(TRIAL)
    assert tracker.flush(30)
    assert calls == ["create_run", "log_batch"]
    tracker.outbox.linger_s = 1.0  # (0.1 s in use) a loaded test machine may be slow to put
    tracker.set_tags(TRIAL, {"samstudy.node": "n1"})
    _log(tracker, range(1, 4))
    time.sleep(0.02)  # the trial's end comes a moment later, within the writer's linger
    tracker.set_status(TRIAL, "completed")
    deadline = time.monotonic() + 30
    while len(calls) < 4 and time.monotonic() < deadline:  # no flush: the writer's own pace
        time.sleep(0.01)
    assert calls[2:] == ["log_batch", "set_terminated"]
    assert tracker.finish(None, timeout=30) == 0
    assert calls[2:] == ["log_batch", "set_terminated"]

    (run,) = _runs(uri)  # all of it arrived: status, tags, params, epochs
    assert run.info.status == "FINISHED"
    assert run.data.tags["samstudy.status"] == "completed"
    assert run.data.tags["samstudy.node"] == "n1"
    assert run.data.tags["samstudy.trial_id"] == TRIAL["trial_id"]
    assert run.data.params["optimizer.rho"] == "0.1"
    assert _history(uri, run.info.run_id) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_a_trial_forgotten_after_a_failure_is_looked_up_not_made_again(uri: str) -> None:
    tracker = StudyTracker(uri, "demo")
    tracker.start()
    tracker.trial_started(TRIAL)
    assert tracker.flush(30)
    calls = _count_requests(tracker)
    # What the outbox does when a write fails: nobody knows whether it reached the store.
    tracker.store.forget(TrialStatus(TRIAL["trial_id"], "running"))
    tracker.set_status(TRIAL, "completed")
    assert tracker.finish(None, timeout=30) == 0
    assert calls[0] == "search_runs"
    (run,) = _runs(uri)  # the run it had, not a second one
    assert run.info.status == "FINISHED" and run.data.tags["samstudy.status"] == "completed"


def test_a_failed_scan_of_the_study_is_redone_not_taken_as_empty(uri: str) -> None:
    """Trials are not looked up one by one after the study's scan, so a scan that failed must be
    made again: otherwise every trial with a run would get a second one."""
    other = {**TRIAL, "trial_id": "fed654cba321", "name": "sam-rho0.2-mlp-n0.4-s1"}
    first = StudyTracker(uri, "demo")
    first.start()
    first.trial_started(TRIAL)
    first.trial_started(other)
    assert first.finish("interrupted", timeout=30) == 0

    second = StudyTracker(uri, "demo")  # a resumed study whose first write meets a failure
    second.set_status(TRIAL, "completed")
    second.set_status(other, "completed")
    search, failures = second.store._search, []

    def failing_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not failures:
            failures.append(1)
            raise ConnectionError("the store dropped the connection")
        return search(*args, **kwargs)

    second.store._search = failing_once
    second.start()
    assert second.finish("complete", timeout=60) == 0
    assert failures  # the scan did fail once
    runs = _runs(uri)
    assert sorted(r.data.tags["samstudy.trial_id"] for r in runs) == sorted(
        [TRIAL["trial_id"], other["trial_id"]]
    )
    assert {r.data.tags["samstudy.status"] for r in runs} == {"completed"}
