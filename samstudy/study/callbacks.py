"""The Tune callbacks on the driver: MLflow tracking, the outcome record, the live view.

This is the only code that knows Tune's result keys and trial objects: the tracker gets plain
metric dicts (:func:`trial_metrics`), the state file plain statuses.

Tune pickles ``RunConfig.callbacks`` into the experiment and brings the pickled ones back on
``Tuner.restore``. So the run config holds a stateless dispatcher (:func:`run_config_callbacks`)
that forwards every hook to the callbacks of the *current* ``run_study`` call
(:func:`dispatching`), never stale copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ray.tune import Callback

from samstudy import tags
from samstudy.study.failures import (
    ERROR,
    Failure,
    StorageFault,
    error_file,
    from_tune_error,
    is_storage_error,
)
from samstudy.study.spec import StudySpec
from samstudy.study.state import ExperimentFiles, save_state
from samstudy.study.tracking import StudyTracker
from samstudy.study.worker import EARLIER_EPOCHS, WALL_TIME, epoch_results, resolve_trial

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
        "gpu_ids",
        "device",
        "done",
        "trial_id",
        "experiment_tag",
        "experiment_id",
        "checkpoint_dir_name",
        "should_checkpoint",
        "config",
    }
)


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric trial metrics of a Tune result (Tune's bookkeeping keys and the ``_`` keys
    of the worker left out)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in _TUNE_KEYS or key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def final_status(last_result: Mapping[str, Any] | None) -> str:
    """A trial's outcome from its last report: ``completed`` / ``diverged`` as the trainer said,
    ``stopped`` when a scheduler ended it while it was still running."""
    status = (last_result or {}).get("status")
    return status if status in ("completed", "diverged") else "stopped"


# -- what the experiment pickles ---------------------------------------------------------------

_ACTIVE: list[Any] = []  # the callbacks of the run_study call in progress


@contextlib.contextmanager
def dispatching(callbacks: Sequence[Any]) -> Iterator[None]:
    """Forward the hooks of every :class:`_Dispatch` to ``callbacks`` while in the block."""
    _ACTIVE[:] = callbacks
    try:
        yield
    finally:
        _ACTIVE.clear()


def run_config_callbacks() -> list[Any]:
    """``RunConfig.callbacks`` of a new experiment: the dispatcher, Tune's JSON logger (whose
    ``result.json`` reconcile reads) and, last, :class:`_DropEarlierEpochs`."""
    from ray.tune.logger import JsonLoggerCallback

    return [_Dispatch(), JsonLoggerCallback(), _DropEarlierEpochs()]


class _Dispatch(Callback):
    """Stateless, picklable forwarder to ``_ACTIVE`` (see the module docstring)."""

    def setup(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.setup(**info)

    def on_step_end(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_step_end(**info)

    def on_trial_start(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_start(**info)

    def on_trial_restore(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_restore(**info)

    def on_trial_result(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_result(**info)

    def on_trial_complete(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_complete(**info)

    def on_trial_recover(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_recover(**info)

    def on_trial_error(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_error(**info)

    def on_checkpoint(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_checkpoint(**info)

    def on_experiment_end(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_experiment_end(**info)


class _DropEarlierEpochs(Callback):
    """Last in the run config: the batched epochs leave the result once the loggers have it.

    Tune keeps each trial's last result and writes it into every snapshot of its experiment
    state (one per ``num_to_keep`` checkpoints of a trial, on the driver). With up to a second of
    epochs batched in it, that JSON was most of the driver's snapshot time; ``result.json`` (the
    JSON logger, before this) keeps every epoch for reconcile.
    """

    def on_trial_result(self, result: dict, **info: Any) -> None:
        result.pop(EARLIER_EPOCHS, None)  # Tune lets callbacks edit the result in place


# -- the callbacks of one run_study call ---------------------------------------------------------


class TrialResolver:
    """Tune trial -> samstudy trial dict, cached per Tune trial id."""

    def __init__(
        self, study: StudySpec, root: Path | None = None, config_ids: bool = False
    ) -> None:
        self.study = study
        self.root = root
        self.config_ids = config_ids  # see resolve_trial
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, config: Mapping[str, Any], tune_trial_id: str) -> dict[str, Any]:
        if tune_trial_id not in self._cache:
            search = "trial" not in config
            self._cache[tune_trial_id] = resolve_trial(
                config, self.study, tune_trial_id if search else None, self.root, self.config_ids
            )
        return self._cache[tune_trial_id]

    def of(self, trial: Any) -> dict[str, Any]:
        """The samstudy trial of a Tune ``Trial``."""
        return self(trial.config, trial.trial_id)


class FailureBook(Callback):
    """Collects each trial attempt's :class:`Failure` on the driver; first of the callbacks.

    ``on_trial_result`` takes the record a failing trial sent and, when it cannot succeed on
    retry, sets the Tune trial's ``max_failures`` to 0 so Tune fails it now. The other callbacks
    read the failure of an error or recovery with :meth:`take` (which falls back to Tune's own
    error when the trial sent none) once per event.
    """

    def __init__(self, max_failures: int, scheme: str = "") -> None:
        self.max_failures = max_failures
        self.scheme = scheme  # of a URI storage, which Tune knows as bucket/prefix/... only
        self._sent: dict[str, Failure] = {}  # Tune trial id -> record of the failing attempt
        self._event: dict[str, Failure] = {}  # Tune trial id -> failure of the current event
        self.final: dict[str, Failure] = {}  # Tune trial id -> why it failed for good
        self.fault: StorageFault | None = None  # set when the storage cannot be written

    def storage_fault(self, message: str) -> NoReturn:
        """Stop the study: the storage cannot be written. Raised through Tune (which wraps it
        in a ``TuneError``), so the runner reads :attr:`fault` rather than the exception."""
        self.fault = StorageFault(message)
        raise self.fault

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        # A trial failed for good in an earlier run and resumed now gets its retries back
        # (Tune restores the max_failures it was given).
        trial.max_failures = self.max_failures
        self._sent.pop(trial.trial_id, None)

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        record = result.get(ERROR)
        if not isinstance(record, Mapping):
            return
        failure = Failure.from_dict(record)
        self._sent[trial.trial_id] = failure
        if failure.storage:  # stop the study now: the trial stays resumable, no retry burnt
            self.storage_fault(failure.summary)
        if not failure.retryable:
            trial.max_failures = 0  # Tune's only say in the retry (see the module docstring)

    def _settle(self, trial: Any) -> Failure:
        failure = self._sent.pop(trial.trial_id, None) or from_tune_error(trial)
        where = failure.error_file or error_file(trial)
        if self.scheme and where and "://" not in where:
            where = f"{self.scheme}://{where.lstrip('/')}"
        if where != failure.error_file:
            failure = Failure(**{**failure.to_dict(), "error_file": where})
        self._event[trial.trial_id] = failure
        return failure

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        self._settle(trial)

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self.final[trial.trial_id] = self._settle(trial)

    def take(self, trial: Any) -> Failure:
        """The failure of the error or recovery event being handled for ``trial``."""
        return self._event.get(trial.trial_id) or self._settle(trial)


class TrackingCallback(Callback):
    """Feeds a :class:`StudyTracker` from Tune's driver-side events."""

    def __init__(
        self, tracker: StudyTracker, resolver: TrialResolver, book: FailureBook | None = None
    ) -> None:
        self.tracker = tracker
        self.resolver = resolver
        self.book = book or FailureBook(0)
        self._nodes: dict[str, str] = {}

    def _log(self, trial: Mapping[str, Any], result: Mapping[str, Any]) -> int:
        epochs = epoch_results(result)
        for epoch in epochs:
            self.tracker.log_epoch(trial, trial_metrics(epoch), epoch.get(WALL_TIME))
        return len(epochs)

    def replay(self, results: Iterable[Mapping[str, Any]], recorded: Mapping[str, Any]) -> int:
        """Queue every epoch of Tune's logged ``results`` (lines of its ``result.json`` files)
        and the terminal statuses ``recorded`` in the state file; returns the epochs read.

        Logged epochs are skipped by the tracker, so this only fills gaps: results buffered in a
        driver that was killed, or an MLflow store that lost them.
        """
        count = 0
        seen: dict[str, Mapping[str, Any]] = {}
        for result in results:
            if "config" not in result or "trial_id" not in result:
                continue
            trial = self.resolver(result["config"], result["trial_id"])
            seen[trial["trial_id"]] = trial
            count += self._log(trial, result)
        for trial_id, trial in seen.items():
            status = recorded.get(trial_id, {}).get("status")
            if status in tags.TERMINAL_STATUSES:
                self.tracker.set_status(trial, status)
        return count

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self.tracker.trial_started(self.resolver.of(trial))

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        samstudy_trial = self.resolver.of(trial)
        node = result.get("node_id")
        if node and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            node_tags = {
                tags.NODE: str(node),
                tags.NODE_IP: str(result.get("node_ip", "")),
                tags.HOSTNAME: str(result.get("hostname", "")),
                tags.GPU_IDS: ",".join(result.get("gpu_ids") or []) or "none",
                tags.DEVICE: str(result.get("device", "")),
            }
            self.tracker.set_tags(samstudy_trial, node_tags)
        self._log(samstudy_trial, result)

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        failure = self.book.take(trial)
        self.tracker.set_status(
            self.resolver.of(trial),
            "running",
            tags={tags.RETRIED: "true", tags.LAST_ERROR: failure.summary},
        )

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        failure = self.book.take(trial)
        self.tracker.set_status(self.resolver.of(trial), "failed", error=failure)


class OutcomeCallback(Callback):
    """Records every trial's outcome in the experiment's state file as it happens.

    The file, not Tune's in-memory trial states (an interrupted run reports never-started trials
    as TERMINATED), decides whether a study is complete.
    """

    def __init__(
        self,
        files: ExperimentFiles,
        state: dict[str, Any],
        resolver: TrialResolver,
        book: FailureBook | None = None,
    ) -> None:
        self.files = files
        self.state = state
        self.resolver = resolver
        self.book = book or FailureBook(0)
        self._running: dict[str, Any] = {}  # Tune trial id -> Tune trial, while it runs
        self._failed: list[tuple[Any, Failure]] = []

    def interrupt(self) -> list[dict[str, Any]]:
        """Record the trials still running as ``interrupted`` (the driver is stopping);
        returns their samstudy trials."""
        trials = [self.resolver.of(t) for t in self._running.values()]
        for trial in trials:
            self.state["trials"][trial["trial_id"]]["status"] = tags.INTERRUPTED
        self._running.clear()
        return trials

    def failed_now(self) -> list[tuple[Any, Failure]]:
        """The Tune trials that failed for good in this run, with their failure."""
        return list(self._failed)

    def _record(
        self, trial: Any, status: str, failure: Failure | None = None, started: bool = False
    ) -> None:
        samstudy_trial = self.resolver.of(trial)
        if started:  # the epoch an earlier run recorded: `trial.last_result` would wait for the
            # new worker's first answer, with the next trial's start held up behind it
            epoch = self.state["trials"].get(samstudy_trial["trial_id"], {}).get("epoch")
        else:
            epoch = failure.epoch if failure is not None else (trial.last_result or {}).get("epoch")
        name = samstudy_trial["name"]
        record = {"name": name, "status": status, "epoch": epoch, "tune_trial_id": trial.trial_id}
        if failure is not None:
            record["error"] = failure.summary
            record["retryable"] = failure.retryable
            record["error_file"] = failure.error_file
        self.state["trials"][samstudy_trial["trial_id"]] = record
        self._save()

    def _save(self) -> None:
        try:
            save_state(self.files, self.state)
        except OSError as exc:
            if is_storage_error(exc):
                self.book.storage_fault(f"{type(exc).__name__}: {exc}")
            raise

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self._running[trial.trial_id] = trial
        self._record(trial, "running", started=True)

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._running.pop(trial.trial_id, None)
        self._record(trial, final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self._running.pop(trial.trial_id, None)
        failure = self.book.take(trial)
        self._failed.append((trial, failure))
        self._record(trial, "failed", failure)
