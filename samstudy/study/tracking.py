"""MLflow tracking of a study, done on the Ray driver so that workers never touch the store.

Layout (docs/architecture.md): one experiment per study, one parent run per study and one child
run per trial. A child run is found by its ``samstudy.trial_id`` tag in the study's experiment,
never by an in-memory map alone, so a retried trial, a resumed study or a second driver process
all log into the same run. Metrics use ``step = epoch``; an epoch already in MLflow is skipped,
so a trial that re-reports from an older checkpoint adds no duplicate steps.

Every write is an *operation* queued for one writer thread. Each operation is idempotent (it
looks the run up before creating it, skips logged epochs, re-sets tags), so retrying one after a
failure is always safe. While the store is unreachable the queue simply grows and training goes
on; the thread retries with back-off and drains the queue when the store returns. Whatever is
still queued when the study ends is written to a spool file and replayed on the next run.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import samstudy
from samstudy import tags as tags_
from samstudy.identity import mlflow_params
from samstudy.paths import project_root
from samstudy.settings import TrackingError, check_tracking_uri, resolve_tracking_uri  # noqa: F401

logger = logging.getLogger(__name__)


ROLE_TAG = tags_.ROLE
STUDY_TAG = tags_.STUDY
TRIAL_TAG = tags_.TRIAL_ID
SHA_TAG = tags_.SHA
STATUS_TAG = tags_.STATUS
GIT_TAG = tags_.GIT
VERSION_TAG = tags_.VERSION
OVERRIDES_TAG = tags_.OVERRIDES
NODE_TAG = tags_.NODE
# A result's wall-clock time (seconds) when the worker produced it: the MLflow timestamp of its
# metrics (epochs reach the driver in batches, see runner.trainable).
WALL_TIME = "_wall_time"
PARENT_TAG = tags_.PARENT
TERMINAL_STATUSES = tags_.TERMINAL_STATUSES

# Keys Ray Tune adds to every result; they are bookkeeping, not trial metrics.
_TUNE_KEYS = frozenset(
    {
        "training_iteration",
        "time_total_s",
        "time_this_iter_s",
        "time_since_restore",
        "iterations_since_restore",
        "timesteps_total",
        "timesteps_since_restore",
        "episodes_total",
        "timestamp",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "node_id",
        "done",
        "trial_id",
        "experiment_tag",
        "experiment_id",
        "checkpoint_dir_name",
        "should_checkpoint",
        "config",
    }
)

_MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_MAX_METRICS_PER_BATCH = 1000
# Error codes that retrying cannot fix: the operation is dropped (and reported) instead.
_PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
)


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    cwd = root or project_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric trial metrics of a Tune result (Tune's own bookkeeping keys left out)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in _TUNE_KEYS or key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (MLflow's default is ``./mlruns``
    in whatever folder the study happened to start from); a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :])
    return (database.parent / "mlartifacts" / experiment).as_uri()


def _is_permanent(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class StudyTracker:
    """Asynchronous, idempotent MLflow writer for one study.

    Call :meth:`start`, then ``trial_started`` / ``log_result`` / ``set_status`` from the driver
    (they only enqueue and never block), and :meth:`finish` at the end. ``trial`` arguments are
    TrialSpec-like dicts with ``trial_id``, ``name``, ``config`` and ``overrides``.
    """

    def __init__(
        self,
        tracking_uri: str,
        study: str,
        *,
        experiment: str | None = None,
        study_sha256: str = "",
        description: str = "",
        spool_path: Path | None = None,
        root: Path | None = None,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.study = study
        self.experiment = experiment or study
        self.study_sha256 = study_sha256
        self.description = description
        self.spool_path = spool_path
        self.git_commit = git_commit(root)
        self.max_backoff_s = max_backoff_s
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.dropped: list[tuple[dict, str]] = []  # (operation, error) that retrying cannot fix
        self._ops: list[dict] = []
        self._trials: dict[str, dict] = {}  # trial_id -> trial dict (needed to create its run)
        self._cond = threading.Condition()
        self._busy = False
        self._single = 0  # operations still to write one by one (after a refused group)
        self._stop = False
        self._online = True
        self._thread: threading.Thread | None = None
        self._client: Any = None
        # Writer-thread state, rebuilt from MLflow on demand (never trusted across failures).
        self._runs: dict[str, str] = {}
        self._last_epoch: dict[str, float] = {}
        self._complete_params: set[str] = set()

    # -- driver side: enqueue only -------------------------------------------------------

    def start(self, *, purge: bool = False, announce: bool = True) -> None:
        """Start the writer and replay the spool of an earlier run.

        ``purge`` first soft-deletes the study's earlier runs (``--fresh``); ``announce`` marks
        the parent run as running (off when only a spool is being sent).
        """
        spooled = self._load_spool()
        with self._cond:
            if purge:
                self._ops.append({"op": "purge"})
            else:
                self._ops.extend(spooled)
            if announce:
                self._ops.append({"op": "study"})
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mlflow-{self.study}", daemon=True
            )
            self._thread.start()

    def trial_started(self, trial: Mapping[str, Any]) -> None:
        """Make sure the trial's run exists and is marked running (retry and resume included)."""
        self._remember(trial)
        self._put({"op": "status", "trial_id": trial["trial_id"], "status": "running"})

    def log_result(self, trial: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Log one epoch's metrics (``metrics['epoch']`` is the step); logged epochs are skipped."""
        self._remember(trial)
        values = trial_metrics(metrics)
        if "epoch" not in values or not math.isfinite(values["epoch"]):
            return
        self._put(
            {
                "op": "metrics",
                "trial_id": trial["trial_id"],
                "epoch": int(values["epoch"]),
                "metrics": values,
                "ts": int(float(metrics.get(WALL_TIME) or time.time()) * 1000),
            }
        )

    def set_status(
        self, trial: Mapping[str, Any], status: str, *, tags: Mapping[str, str] | None = None
    ) -> None:
        """Set ``samstudy.status`` (terminal statuses also end the run) and any extra tags."""
        self._remember(trial)
        op = {
            "op": "status",
            "trial_id": trial["trial_id"],
            "status": status,
            "ts": int(time.time() * 1000),
        }
        if tags:
            op["tags"] = dict(tags)
        self._put(op)

    def set_tags(self, trial: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Set extra tags on a trial's run (for instance the node it ran on)."""
        self._remember(trial)
        self._put({"op": "tags", "trial_id": trial["trial_id"], "tags": dict(tags)})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._ops or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.2 if remaining is None else min(remaining, 0.2))
        return True

    def finish(self, status: str | None, timeout: float = 60.0) -> int:
        """End the parent run with ``status`` (``complete``, ``failed``, ``interrupted``; None
        leaves it as it is), flush, stop the writer and spool what is left.

        Returns the number of operations still pending (0 means everything reached MLflow).
        """
        if status is not None:
            self._put({"op": "study_end", "status": status, "ts": int(time.time() * 1000)})
        try:
            self.flush(timeout)
        except KeyboardInterrupt:  # a second Ctrl+C cuts the wait short, not the spool
            logger.warning("flush interrupted; spooling what is left")
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._cond:
            left = list(self._ops)
            self._ops.clear()
        self._save_spool(left)
        if left:
            logger.warning(
                "MLflow at %s unreachable: %d tracking operations spooled to %s; they are "
                "sent on the next `samstudy study %s`",
                self.tracking_uri,
                len(left),
                self.spool_path,
                self.study,
            )
        return len(left)

    @property
    def pending(self) -> int:
        """Operations not yet written."""
        with self._cond:
            return len(self._ops)

    @property
    def online(self) -> bool:
        """False while the store is failing."""
        return self._online

    def _remember(self, trial: Mapping[str, Any]) -> None:
        trial_id = trial["trial_id"]
        if trial_id not in self._trials:
            self._trials[trial_id] = {
                "trial_id": trial_id,
                "name": trial.get("name", trial_id),
                "config": dict(trial.get("config", {})),
                "overrides": dict(trial.get("overrides", {})),
                "variant": trial.get("variant", ""),
                "variant_id": trial.get("variant_id", ""),
            }

    def _put(self, op: dict) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    # -- spool -----------------------------------------------------------------------------

    def _load_spool(self) -> list[dict]:
        if self.spool_path is None or not self.spool_path.is_file():
            return []
        try:
            data = json.loads(self.spool_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable MLflow spool %s: %s", self.spool_path, exc)
            return []
        for trial in data.get("trials", {}).values():
            self._remember(trial)
        # The file stays until finish() rewrites or removes it: a crash before then replays it
        # again, which is harmless because every operation is idempotent.
        return list(data.get("ops", []))

    def _save_spool(self, ops: list[dict]) -> None:
        if self.spool_path is None:
            return
        if not ops:
            self.spool_path.unlink(missing_ok=True)
            return
        needed = {op["trial_id"] for op in ops if "trial_id" in op}
        data = {"trials": {k: v for k, v in self._trials.items() if k in needed}, "ops": ops}
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.spool_path)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._ops and not self._stop:
                    self._cond.wait()
                if self._stop:  # finish() flushed first; what is left goes to the spool
                    return
                ops = self._next_ops()
                op = ops[0]
                self._busy = True
            try:
                if op["op"] == "metrics":
                    self._log_metrics(ops)
                else:
                    self._apply(op)
            except Exception as exc:  # noqa: BLE001 - any store failure is retried or recorded
                if _is_permanent(exc) and len(ops) > 1:
                    # retry the group one operation at a time: drop only what is refused
                    with self._cond:
                        self._single = len(ops)
                        self._busy = False
                    continue
                if _is_permanent(exc):
                    logger.warning("MLflow refused %s: %s (dropped)", op.get("op"), exc)
                    self.dropped.append((op, str(exc)))
                    self._done(ops)
                    continue
                if self._online:
                    logger.warning(
                        "MLflow at %s unreachable (%s); training goes on, results are "
                        "buffered and sent when it returns",
                        self.tracking_uri,
                        type(exc).__name__,
                    )
                self._online = False
                self._forget_cache(op)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    if self._stop:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if not self._online:
                logger.warning("MLflow at %s reachable again; flushing", self.tracking_uri)
            self._online = True
            backoff = 0.5
            self._done(ops)

    def _next_ops(self) -> list[dict]:
        """The head of the queue: one operation, or a run of one trial's epochs (caller holds
        the lock). Epochs arrive in batches (see ``runner.trainable``); one ``log_batch`` for
        a batch costs a store transaction instead of one per epoch (~10 ms of driver CPU each
        on sqlite, taken from the trials on a small machine)."""
        head = self._ops[0]
        ops = [head]
        if head["op"] != "metrics" or self._single:
            return ops
        size = len(head["metrics"])
        for op in itertools.islice(self._ops, 1, None):
            if op["op"] != "metrics" or op["trial_id"] != head["trial_id"]:
                break
            size += len(op["metrics"])
            if size > _MAX_METRICS_PER_BATCH:
                break
            ops.append(op)
        return ops

    def _done(self, ops: list[dict]) -> None:
        with self._cond:
            self._single = max(0, self._single - len(ops))
            for op in ops:
                if self._ops and self._ops[0] is op:
                    self._ops.pop(0)
            self._busy = False
            self._cond.notify_all()

    def _forget_cache(self, op: dict) -> None:
        # After a failure we cannot know what reached the store: look it up again next time.
        trial_id = op.get("trial_id")
        if trial_id is not None:
            self._runs.pop(trial_id, None)
            self._last_epoch.pop(trial_id, None)
        if op.get("op") in {"study", "purge"}:
            self.experiment_id = None
            self.parent_run_id = None

    def _get_client(self) -> Any:
        if self._client is None:
            # MLflow's own retries would hold this thread for minutes per call on a dead server;
            # the writer retries by itself. One "View run at" line per finished run is noise.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _apply(self, op: dict) -> None:
        kind = op["op"]
        if kind == "purge":
            self._purge()
        elif kind == "study":
            self._mark_study_running()
        elif kind == "metrics":
            self._log_metrics([op])
        elif kind == "status":
            self._set_status(op)
        elif kind == "tags":
            run_id = self._ensure_trial(op["trial_id"])
            self._get_client().log_batch(run_id, tags=self._run_tags(op["tags"]))
        elif kind == "study_end":
            self._end_study(op)
        else:  # a spool from a newer version: keep nothing we do not understand
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _ensure_experiment(self) -> str:
        if self.experiment_id is None:
            client = self._get_client()
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                self.experiment_id = client.create_experiment(
                    self.experiment,
                    artifact_location=_artifact_location(self.tracking_uri, self.experiment),
                    tags={STUDY_TAG: self.study},
                )
            else:
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment.experiment_id)
                self.experiment_id = experiment.experiment_id
        return self.experiment_id

    def _ensure_study(self) -> str:
        if self.parent_run_id is not None:
            return self.parent_run_id
        client = self._get_client()
        exp_id = self._ensure_experiment()
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{STUDY_TAG}` = '{self.study}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        tags = {
            ROLE_TAG: "parent",
            STUDY_TAG: self.study,
            SHA_TAG: self.study_sha256,
            GIT_TAG: self.git_commit,
            VERSION_TAG: samstudy.__version__,
            STATUS_TAG: "running",
        }
        if self.description:
            tags["mlflow.note.content"] = self.description
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(exp_id, run_name=self.study, tags=tags).info.run_id
        self.parent_run_id = run_id
        self._load_children()
        return run_id

    def _mark_study_running(self) -> None:
        run_id = self._ensure_study()
        tags = {SHA_TAG: self.study_sha256, GIT_TAG: self.git_commit, STATUS_TAG: "running"}
        self._get_client().log_batch(run_id, tags=self._run_tags(tags))
        self._get_client().update_run(run_id, status="RUNNING")

    def _load_children(self) -> None:
        """One paged search for every trial run of the study (not one lookup per trial)."""
        client = self._get_client()
        token = None
        while True:
            page = client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{self.study}'",
                order_by=["attributes.start_time DESC"],
                max_results=1000,
                page_token=token,
            )
            for run in page:  # oldest last, so the oldest run of a trial id wins
                self._cache_run(run)
            token = page.token
            if not token:
                break

    def _cache_run(self, run: Any) -> None:
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id is None:
            return
        self._runs[trial_id] = run.info.run_id
        self._last_epoch[trial_id] = run.data.metrics.get("epoch", 0.0)
        if run.data.params:
            self._complete_params.add(trial_id)

    def _purge(self) -> None:
        """Soft-delete the parent and child runs of the study (``mlflow gc`` removes them)."""
        client = self._get_client()
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return
        while True:
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{STUDY_TAG}` = '{self.study}'",
                max_results=1000,
            )
            if not runs:
                break
            for run in runs:
                client.delete_run(run.info.run_id)
        self._runs.clear()
        self._last_epoch.clear()
        self._complete_params.clear()
        self.parent_run_id = None

    def _run_tags(self, tags: Mapping[str, str]) -> list:
        from mlflow.entities import RunTag

        return [RunTag(k, str(v)) for k, v in tags.items()]

    def _ensure_trial(self, trial_id: str) -> str:
        parent = self._ensure_study()
        client = self._get_client()
        run_id = self._runs.get(trial_id)
        if run_id is None:
            # Another driver (or a failed request that did reach the store) may have made it.
            found = client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{ROLE_TAG}` = 'trial'",
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:
                self._cache_run(found[0])
                run_id = self._runs[trial_id]
        trial = self._trials.get(trial_id, {"trial_id": trial_id, "name": trial_id})
        if run_id is None:
            tags = {
                ROLE_TAG: "trial",
                STUDY_TAG: self.study,
                TRIAL_TAG: trial_id,
                SHA_TAG: self.study_sha256,
                GIT_TAG: self.git_commit,
                VERSION_TAG: samstudy.__version__,
                STATUS_TAG: "running",
                PARENT_TAG: parent,
                OVERRIDES_TAG: json.dumps(trial.get("overrides", {}), sort_keys=True)[:5000],
            }
            if trial.get("variant_id"):
                tags[tags_.VARIANT] = trial["variant"]
                tags[tags_.VARIANT_ID] = trial["variant_id"]
            run = client.create_run(self.experiment_id, run_name=trial["name"], tags=tags)
            run_id = run.info.run_id
            self._runs[trial_id] = run_id
            self._last_epoch[trial_id] = 0.0
        if trial_id not in self._complete_params and trial.get("config"):
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in mlflow_params(trial["config"]).items()]
            for chunk in _chunks(params, _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=chunk)  # same values again are accepted
            self._complete_params.add(trial_id)
        return run_id

    def _log_metrics(self, ops: list[dict]) -> None:
        """Log the epochs of one trial (one operation each), in as few ``log_batch`` calls as
        MLflow's limit allows, without splitting an epoch unless it alone is over the limit."""
        from mlflow.entities import Metric

        trial_id = ops[0]["trial_id"]
        run_id = self._ensure_trial(trial_id)
        batch: list[Metric] = []
        batch_last = None

        def send() -> None:
            for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
                self._get_client().log_batch(run_id, metrics=chunk)
            if batch_last is not None:
                self._last_epoch[trial_id] = float(batch_last)
            batch.clear()

        for op in ops:
            epoch = op["epoch"]
            if epoch <= max(self._last_epoch.get(trial_id, 0.0), batch_last or 0):
                continue  # a retried or resumed trial re-reporting an epoch MLflow already has
            values = dict(op["metrics"])
            # `epoch` goes last: it is the marker of a logged step, so it must not precede the
            # rest (an epoch is never split across calls unless it alone is over the limit).
            last = values.pop("epoch")
            metrics = [Metric(k, v, op["ts"], epoch) for k, v in values.items()]
            metrics.append(Metric("epoch", last, op["ts"], epoch))
            if batch and len(batch) + len(metrics) > _MAX_METRICS_PER_BATCH:
                send()
            batch.extend(metrics)
            batch_last = epoch
        send()

    def _set_status(self, op: dict) -> None:
        client = self._get_client()
        run_id = self._ensure_trial(op["trial_id"])
        status = op["status"]
        tags = {STATUS_TAG: status, **op.get("tags", {})}
        client.log_batch(run_id, tags=self._run_tags(tags))
        if status in TERMINAL_STATUSES:
            mlflow_status = "FAILED" if status == "failed" else "FINISHED"
            client.set_terminated(run_id, status=mlflow_status, end_time=op.get("ts"))
        elif status == "running":
            client.update_run(run_id, status="RUNNING")

    def _end_study(self, op: dict) -> None:
        client = self._get_client()
        run_id = self._ensure_study()
        client.log_batch(run_id, tags=self._run_tags({STATUS_TAG: op["status"]}))
        if op["status"] in {"complete", "failed"}:
            mlflow_status = "FINISHED" if op["status"] == "complete" else "FAILED"
            client.set_terminated(run_id, status=mlflow_status, end_time=op["ts"])
        else:  # interrupted: a later `samstudy study` resumes it and marks it RUNNING again
            client.set_terminated(run_id, status="KILLED", end_time=op["ts"])
