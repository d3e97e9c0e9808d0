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
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from samstudy import tags
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

    def __init__(self, study: StudySpec, root: Path | None = None) -> None:
        self.study = study
        self.root = root
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, config: Mapping[str, Any], tune_trial_id: str) -> dict[str, Any]:
        if tune_trial_id not in self._cache:
            search = "trial" not in config
            self._cache[tune_trial_id] = resolve_trial(
                config, self.study, tune_trial_id if search else None, self.root
            )
        return self._cache[tune_trial_id]

    def of(self, trial: Any) -> dict[str, Any]:
        """The samstudy trial of a Tune ``Trial``."""
        return self(trial.config, trial.trial_id)


class TrackingCallback(Callback):
    """Feeds a :class:`StudyTracker` from Tune's driver-side events."""

    def __init__(self, tracker: StudyTracker, resolver: TrialResolver) -> None:
        self.tracker = tracker
        self.resolver = resolver
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
            }
            self.tracker.set_tags(samstudy_trial, node_tags)
        self._log(samstudy_trial, result)

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), "running", tags={tags.RETRIED: "true"})

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), "failed")


class OutcomeCallback(Callback):
    """Records every trial's outcome in the experiment's state file as it happens.

    The file, not Tune's in-memory trial states (an interrupted run reports never-started trials
    as TERMINATED), decides whether a study is complete.
    """

    def __init__(
        self, files: ExperimentFiles, state: dict[str, Any], resolver: TrialResolver
    ) -> None:
        self.files = files
        self.state = state
        self.resolver = resolver

    def _record(self, trial: Any, status: str) -> None:
        samstudy_trial = self.resolver.of(trial)
        epoch = (trial.last_result or {}).get("epoch")
        self.state["trials"][samstudy_trial["trial_id"]] = {
            "name": samstudy_trial["name"],
            "status": status,
            "epoch": epoch,
            "tune_trial_id": trial.trial_id,
        }
        save_state(self.files, self.state)

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self._record(trial, "running")

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._record(trial, final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self._record(trial, "failed")


class ProgressCallback(Callback):
    """A compact live view: one line per trial event, epoch lines throttled per trial, and a
    summary line every ``summary_s`` seconds."""

    KEYS = ("train_loss", "train_acc", "test_acc", "best_test_acc", "memorization")

    def __init__(
        self,
        total: int,
        resolver: TrialResolver,
        done: int = 0,
        out: TextIO | None = None,
        interval_s: float = 10.0,
        summary_s: float = 30.0,
    ) -> None:
        self.total = total
        self.resolver = resolver
        self.done = done
        self.out = out or sys.stdout
        self.interval_s = interval_s
        self.summary_s = summary_s
        self.start = time.monotonic()
        self._last_line: dict[str, float] = {}
        self._last_summary = self.start
        self._running: set[str] = set()
        self._started: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {text}", file=self.out, flush=True)

    def _label(self, trial: Any) -> str:
        inner = self.resolver.of(trial)
        return f"{inner['trial_id'][:12]} {inner['name']}"

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self._running.add(trial.trial_id)
        self._started[trial.trial_id] = time.monotonic()
        self._print(f"{'start':<10}{self._label(trial)}  ({len(self._running)} running)")

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_line.get(trial.trial_id, -math.inf) < self.interval_s:
            return
        self._last_line[trial.trial_id] = now
        epochs = self.resolver.of(trial)["config"].get("epochs", "?")
        values = " ".join(
            f"{k} {result[k]:.4g}" for k in self.KEYS if isinstance(result.get(k), int | float)
        )
        self._print(f"epoch {result.get('epoch', '?')}/{epochs}  {self._label(trial)}  {values}")

    def _finished(self, trial: Any, status: str) -> None:
        self._running.discard(trial.trial_id)
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        took = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        last = trial.last_result or {}
        best = last.get("best_test_acc")
        extra = f" best_test_acc {best:.4g}" if isinstance(best, int | float) else ""
        self._print(
            f"{status:<10}{self._label(trial)}  epoch {last.get('epoch', '?')}{extra} "
            f"({took:.1f} s)  [{self.done}/{self.total} done]"
        )

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._finished(trial, final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self._finished(trial, "FAILED")

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._print(
            f"{'retry':<10}{self._label(trial)}  (failed after epoch {epoch}; from checkpoint)"
        )

    def on_step_end(self, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_summary >= self.summary_s:
            self._last_summary = now
            counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
            self._print(
                f"{'summary':<10}{self.done}/{self.total} done ({counts or 'none yet'}), "
                f"{len(self._running)} running"
            )
