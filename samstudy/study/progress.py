"""The study's live view on the console: one line per trial event, throttled epoch lines and a
periodic summary; a failed or retried trial's line carries its error (from the FailureBook)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from samstudy.study.callbacks import FailureBook, TrialResolver, final_status
from samstudy.study.failures import ERROR, Failure
from samstudy.study.status import duration, eta_seconds


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
        book: FailureBook | None = None,
    ) -> None:
        self.total = total
        self.resolver = resolver
        self.book = book or FailureBook(0)
        self.done = done
        self.out = out or sys.stdout
        self.interval_s = interval_s
        self.summary_s = summary_s
        self.start = time.monotonic()
        self._last_line: dict[str, float] = {}
        self._last_summary = self.start
        self._running: set[str] = set()
        self._started: dict[str, float] = {}
        self._pace: dict[str, tuple[int, int, float]] = {}  # (epoch, epochs, s/epoch) running
        self._took: list[float] = []  # seconds of each trial finished in this run
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
        if ERROR in result:  # the failure itself is printed by on_trial_error / _recover
            return
        epochs = self.resolver.of(trial)["config"].get("epochs", "?")
        each = result.get("epoch_time")
        if isinstance(result.get("epoch"), int) and isinstance(epochs, int) and each:
            self._pace[trial.trial_id] = (result["epoch"], epochs, float(each))
        now = time.monotonic()
        if now - self._last_line.get(trial.trial_id, -math.inf) < self.interval_s:
            return
        self._last_line[trial.trial_id] = now
        values = " ".join(
            f"{k} {result[k]:.4g}" for k in self.KEYS if isinstance(result.get(k), int | float)
        )
        self._print(f"epoch {result.get('epoch', '?')}/{epochs}  {self._label(trial)}  {values}")

    def _finished(self, trial: Any, status: str, failure: Failure | None = None) -> None:
        self._running.discard(trial.trial_id)
        self._pace.pop(trial.trial_id, None)
        if failure is None and trial.trial_id in self._started:
            self._took.append(time.monotonic() - self._started[trial.trial_id])
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        took = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        if failure is not None:
            why = (
                "not retried: it cannot succeed on retry"
                if not failure.retryable
                else (f"after {trial.run_metadata.num_failures} attempts")
            )
            self._print(
                f"{status:<10}{self._label(trial)}  {failure.summary} ({why}; traceback: "
                f"{failure.error_file})  [{self.done}/{self.total} done]"
            )
            return
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
        self._finished(trial, "FAILED", self.book.take(trial))

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        self._running.discard(trial.trial_id)
        failure = self.book.take(trial)
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None:
            start = "from its last checkpoint"
        else:
            start = "from the start: no checkpoint yet"
        attempt = trial.run_metadata.num_failures + 1
        self._print(
            f"{'retry':<10}{self._label(trial)}  {failure.summary} (attempt {attempt} of "
            f"{trial.max_failures + 1}, {start})"
        )

    def on_step_end(self, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_summary >= self.summary_s:
            self._last_summary = now
            counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
            self._print(
                f"{'summary':<10}{self.done}/{self.total} done ({counts or 'none yet'}), "
                f"{len(self._running)} running{self._eta()}"
            )

    def _eta(self) -> str:
        """``; ETA ...`` as ``samstudy status`` computes it, from this run's measurements."""
        pending = max(0, self.total - self.done - len(self._running))
        mean = sum(self._took) / len(self._took) if self._took else None
        eta = eta_seconds(list(self._pace.values()), pending, mean, max(1, len(self._running)))
        return "" if eta is None else f"; ETA {duration(eta)}"
