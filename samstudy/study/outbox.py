"""The outbox in front of the MLflow store: training never waits for MLflow.

Operations are queued and written by one background thread. While the store is unreachable the
queue simply grows and training goes on; the thread retries with back-off (every operation is
idempotent, see ``samstudy.study.store``) and drains the queue when the store returns. A refusal
that retrying cannot fix drops only the refused operation (recorded in ``dropped``). Whatever is
still queued when the study ends is written to a spool file and replayed on the next run.

The spool file has a cap (``spool_max_mb``; ``samstudy.settings.spool_max_mb``: 200 MB unless
set). Over it, every study, status and tag operation is still kept (they are small, and a run
without its status would be wrong), and per-epoch metrics are kept oldest first up to the cap;
once one epoch of a trial does not fit, none of that trial's later epochs is kept (MLflow then
holds a gap-free prefix of each trial, which a later replay can extend: the store skips only
epochs at or below the last one logged). Nothing goes silently: an error is logged with the
number of epochs and metric values not kept and their trials, each such trial's run gets the
``samstudy.spool_cut`` tag, and :attr:`Outbox.not_spooled` holds them. Those epochs remain in
the study's Ray results (``<storage>/NAME/<trial>/result.json``).

A trial's adjacent queued operations go to the store together: its epochs in one ``log_batch``
(a store transaction instead of one per epoch: 2-15 ms of driver CPU each on sqlite, taken
from the trials on a small machine), with its tags and a status that follows them. The writer
waits ``linger_s`` after a quiet spell before it writes, so that a short trial's last result and
its end, which Tune reports ~15 ms apart, make one group: two requests instead of four.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

from samstudy import tags
from samstudy.paths import redact
from samstudy.study.operations import (
    Operation,
    TrialInfo,
    TrialMetrics,
    TrialStatus,
    TrialTags,
    from_record,
    to_record,
    trial_id_of,
)
from samstudy.study.store import MAX_METRICS_PER_BATCH, MlflowStore, is_permanent

logger = logging.getLogger(__name__)
DEFAULT_SPOOL_MAX_MB = 200.0  # samstudy.settings.DEFAULT_SPOOL_MAX_MB, the documented default
_GROUPED = (TrialMetrics, TrialTags, TrialStatus)  # what one trial's group may hold
LINGER_S = 0.1  # how long the first operation after a quiet spell waits for the ones after it


class Outbox:
    """A queue of operations for ``store``, written by a thread; spooled to ``spool_path``."""

    def __init__(
        self,
        store: MlflowStore,
        spool_path: Path | None = None,
        *,
        max_backoff_s: float = 10.0,
        name: str = "mlflow",
        spool_max_mb: float = DEFAULT_SPOOL_MAX_MB,
        linger_s: float = LINGER_S,
    ) -> None:
        if not spool_max_mb > 0:
            raise ValueError(f"spool_max_mb must be positive, not {spool_max_mb!r}")
        self.store = store
        self.spool_path = spool_path
        self.spool_max_mb = spool_max_mb
        self.not_spooled: list[TrialMetrics] = []  # epochs over the spool's cap (logged loudly)
        self.max_backoff_s = max_backoff_s
        self.linger_s = linger_s
        self._linger_until = 0.0  # the writer waits for more operations until then
        self._flushing = 0  # callers waiting in flush(): no lingering
        self.name = name
        self.dropped: list[tuple[Operation, str]] = []  # refused by the store, with the error
        self._ops: list[Operation] = []
        self._cond = threading.Condition()
        self._busy = False
        self._single = 0  # operations still to write one by one (after a refused group)
        self._stop = False
        self._online = True
        self._thread: threading.Thread | None = None

    # -- the caller's side -----------------------------------------------------------------

    def put(self, *ops: Operation) -> None:
        """Queue ``ops`` (never blocks on the store)."""
        with self._cond:
            if not self._ops:
                self._linger_until = time.monotonic() + self.linger_s
            self._ops.extend(ops)
            self._cond.notify_all()

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()  # a lingering writer writes now
            try:
                while self._ops or self._busy:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(0.2 if remaining is None else min(remaining, 0.2))
            finally:
                self._flushing -= 1
        return True

    def close(self) -> int:
        """Stop the writer and spool what is left; returns the number of operations spooled."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._cond:
            left = list(self._ops)
            self._ops.clear()
        try:
            self._save_spool(left)
        except OSError as exc:  # a full disk: say what is lost rather than crash the driver
            logger.error(
                "could not write the MLflow spool %s (%s): %d tracking operations are lost; "
                "the study's Ray results keep the epochs (a rerun replays them)",
                self.spool_path,
                redact(exc),
                len(left),
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

    # -- spool -----------------------------------------------------------------------------

    def load_spool(self) -> list[Operation]:
        """The operations of an earlier run's spool (their trials go to the store).

        The file stays until :meth:`close` rewrites or removes it: a crash before then replays
        it again, which is harmless because every operation is idempotent.
        """
        if self.spool_path is None or not self.spool_path.is_file():
            return []
        try:
            data = json.loads(self.spool_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable MLflow spool %s: %s", self.spool_path, exc)
            return []
        for trial in data.get("trials", {}).values():
            self.store.remember(TrialInfo.from_mapping(trial))
        ops = []
        for record in data.get("ops", []):
            try:
                ops.append(from_record(record))
            except (TypeError, ValueError) as exc:  # a spool of a newer version
                logger.warning("MLflow spool %s: skipping %r (%s)", self.spool_path, record, exc)
        return ops

    def _save_spool(self, ops: list[Operation]) -> None:
        if self.spool_path is None:
            return
        if not ops:
            self.spool_path.unlink(missing_ok=True)
            return
        records = self._within_cap(ops)
        needed = {trial_id_of(op) for op, _ in records} - {None}
        trials = {k: asdict(v) for k, v in self.store.trials.items() if k in needed}
        # The JSON of {"trials": ..., "ops": [...]}, built from the records already measured.
        text = f'{{"trials": {json.dumps(trials)}, "ops": [{", ".join(r for _, r in records)}]}}'
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.spool_path)
        if self.not_spooled:
            self._report_cut(len(text))

    def _within_cap(self, ops: list[Operation]) -> list[tuple[Operation, str]]:
        """The operations (with their JSON records) that the spool keeps under its cap; the
        epochs it cannot keep go to :attr:`not_spooled` (rule: the module docstring)."""
        self.not_spooled = []
        pairs = [(op, json.dumps(to_record(op))) for op in ops]
        trials = {trial_id_of(op) for op in ops} - {None}
        known = {k: asdict(v) for k, v in self.store.trials.items() if k in trials}
        # What is always kept: the trials' records and every non-metric operation, plus a
        # margin for the spool_cut tags added below.
        fixed = len(json.dumps(known)) + 200 * (len(trials) + 1)
        fixed += sum(len(r) + 2 for op, r in pairs if not isinstance(op, TrialMetrics))
        budget = int(self.spool_max_mb * 1_000_000) - fixed
        kept: list[tuple[Operation, str]] = []
        cut_trials: set[str] = set()
        for op, record in pairs:
            if isinstance(op, TrialMetrics):
                if op.trial_id in cut_trials or len(record) + 2 > budget:
                    cut_trials.add(op.trial_id)  # no later epoch of it: keep a gap-free prefix
                    self.not_spooled.append(op)
                    continue
                budget -= len(record) + 2
            kept.append((op, record))
        for trial_id in sorted(cut_trials):
            epochs = sorted(op.epoch for op in self.not_spooled if op.trial_id == trial_id)
            note = TrialTags(
                trial_id,
                {
                    tags.SPOOL_CUT: f"epochs {epochs[0]}-{epochs[-1]} ({len(epochs)}) not sent: "
                    f"the MLflow spool was over its cap of {self.spool_max_mb:g} MB"
                },
            )
            kept.append((note, json.dumps(to_record(note))))
        return kept

    def _report_cut(self, size: int) -> None:
        values = sum(len(op.metrics) for op in self.not_spooled)
        trials = sorted({op.trial_id for op in self.not_spooled})
        logger.error(
            "MLflow spool %s reached its cap of %g MB (tracking.spool_max_mb / "
            "SAMSTUDY_SPOOL_MAX_MB): kept every status and the earliest epochs (%.1f MB); "
            "NOT KEPT: %d epochs (%d metric values) of %d trials (%s). They stay in the study's "
            "Ray results (<storage>/NAME/<trial>/result.json); their MLflow runs are tagged %s",
            self.spool_path,
            self.spool_max_mb,
            size / 1e6,
            len(self.not_spooled),
            values,
            len(trials),
            ", ".join(trials[:10]) + (" ..." if len(trials) > 10 else ""),
            tags.SPOOL_CUT,
        )

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._ops and not self._stop:
                    self._cond.wait()
                while not self._stop and not self._flushing:
                    left = self._linger_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stop:  # the caller flushed first; what is left goes to the spool
                    return
                ops = self._next_ops()
                self._busy = True
            try:
                if len(ops) > 1:
                    self.store.write_trial(ops)
                else:
                    self.store.apply(ops[0])
            except Exception as exc:  # noqa: BLE001 - any store failure is retried or recorded
                if is_permanent(exc) and len(ops) > 1:
                    # retry the group one operation at a time: drop only what is refused
                    with self._cond:
                        self._single = len(ops)
                        self._busy = False
                    continue
                if is_permanent(exc):
                    logger.warning("MLflow refused %s: %s (dropped)", ops[0].KIND, redact(exc))
                    self.dropped.append((ops[0], redact(exc)))
                    self._done(ops)
                    continue
                if self._online:
                    logger.warning(
                        "MLflow at %s unreachable (%s); training goes on, results are "
                        "buffered and sent when it returns",
                        redact(self.store.tracking_uri),
                        type(exc).__name__,
                    )
                self._online = False
                self.store.forget(ops[0])
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    if self._stop:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if not self._online:
                logger.warning(
                    "MLflow at %s reachable again; flushing", redact(self.store.tracking_uri)
                )
            self._online = True
            backoff = 0.5
            self._done(ops)

    def _next_ops(self) -> list[Operation]:
        """The head of the queue: one operation, or adjacent operations of one trial, its tags
        and epochs and a status that ends the group, of at most MLflow's entries per
        ``log_batch`` (the caller holds the lock)."""
        head = self._ops[0]
        ops = [head]
        if not isinstance(head, TrialMetrics | TrialTags) or self._single:
            return ops
        size = _entries(head)
        for op in itertools.islice(self._ops, 1, None):
            if not isinstance(op, _GROUPED) or op.trial_id != head.trial_id:
                break
            size += _entries(op)
            if size > MAX_METRICS_PER_BATCH:  # one log_batch that MLflow does not split
                break
            ops.append(op)
            if isinstance(op, TrialStatus):
                break
        return ops

    def _done(self, ops: list[Operation]) -> None:
        with self._cond:
            self._single = max(0, self._single - len(ops))
            for op in ops:
                if self._ops and self._ops[0] is op:
                    self._ops.pop(0)
            self._busy = False
            self._cond.notify_all()


def _entries(op: TrialMetrics | TrialTags | TrialStatus) -> int:
    """The metrics and tags ``op`` adds to its group's ``log_batch``."""
    if isinstance(op, TrialMetrics):
        return len(op.metrics)
    if isinstance(op, TrialTags):
        return len(op.tags)
    return 1 + len(op.tags)  # the status tag and its own
