"""MLflow tracking of a study, done on the Ray driver so that workers never touch the store.

:class:`StudyTracker` is what the runner and its Tune callbacks call. It turns trial events into
typed operations (``samstudy.study.operations``: idempotent, so retrying one is always safe) and
queues them in an :class:`~samstudy.study.outbox.Outbox`, whose thread has the
:class:`~samstudy.study.store.MlflowStore` write them while training goes on, buffers them while
the store is away and spools what is left at the end.
Metrics arrive here as plain ``{name: number}`` dicts: the callbacks strip Tune's bookkeeping.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samstudy import settings
from samstudy import tags as tag_names
from samstudy.paths import project_root, redact
from samstudy.study.failures import Failure
from samstudy.study.operations import (
    EndStudy,
    MarkStudy,
    Operation,
    Purge,
    TrialInfo,
    TrialMetrics,
    TrialStatus,
    TrialTags,
)
from samstudy.study.outbox import Outbox
from samstudy.study.store import MlflowStore, StudyInfo

logger = logging.getLogger(__name__)


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


def _now_ms() -> int:
    return int(time.time() * 1000)


class StudyTracker:
    """Asynchronous, idempotent MLflow writer for one study.

    Call :meth:`start`, then ``trial_started`` / ``log_epoch`` / ``set_status`` / ``set_tags``
    from the driver (they only enqueue and never block), and :meth:`finish` at the end.
    ``trial`` arguments are trial dicts (``TrialSpec.to_dict()``: ``trial_id``, ``name``,
    ``config``, ``overrides``, ``variant``, ``variant_id``). ``overrides`` are the study's
    ``--set`` assignments, tagged on the parent run at every start. ``spool_max_mb`` caps the
    spool file (``samstudy.study.outbox``; default ``samstudy.settings.spool_max_mb()``).
    """

    def __init__(
        self,
        tracking_uri: str,
        study: str,
        *,
        experiment: str | None = None,
        study_sha256: str = "",
        description: str = "",
        overrides: Sequence[str] = (),
        total: int | None = None,
        spool_path: Path | None = None,
        root: Path | None = None,
        max_backoff_s: float = 10.0,
        spool_max_mb: float | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.study = study
        self.overrides = tuple(overrides)
        self.total = total
        info = StudyInfo(
            name=study,
            experiment=experiment or study,
            sha256=study_sha256,
            description=description,
            git_commit=git_commit(root),
        )
        self.store = MlflowStore(tracking_uri, info)
        self.outbox = Outbox(
            self.store,
            spool_path,
            max_backoff_s=max_backoff_s,
            name=f"mlflow-{study}",
            # None: $SAMSTUDY_SPOOL_MAX_MB, else the default (the study file's value wins)
            spool_max_mb=settings.spool_max_mb() if spool_max_mb is None else spool_max_mb,
        )

    def start(self, *, purge: bool = False, announce: bool = True) -> None:
        """Start the writer and replay the spool of an earlier run.

        ``purge`` first soft-deletes the study's earlier runs (``--fresh``) instead; ``announce``
        marks the parent run as running (off when only a spool is being sent).
        """
        spooled = self.outbox.load_spool()
        ops: list[Operation] = [Purge()] if purge else spooled
        if announce:
            ops.append(MarkStudy(self.overrides, self.total))
        self.outbox.put(*ops)
        self.outbox.start()

    def trial_started(self, trial: Mapping[str, Any]) -> None:
        """Make sure the trial's run exists and is marked running (retry and resume included)."""
        self.outbox.put(TrialStatus(self._remember(trial), "running"))

    def log_epoch(
        self, trial: Mapping[str, Any], metrics: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        """Log one epoch: ``metrics['epoch']`` is the step (no finite epoch: nothing logged);
        ``wall_time`` (seconds, default now) its timestamp. Logged epochs are skipped."""
        trial_id = self._remember(trial)
        epoch = metrics.get("epoch")
        if epoch is None or not math.isfinite(epoch):
            return
        ts = int(float(wall_time or time.time()) * 1000)
        self.outbox.put(TrialMetrics(trial_id, int(epoch), dict(metrics), ts))

    def set_status(
        self,
        trial: Mapping[str, Any],
        status: str,
        *,
        tags: Mapping[str, str] | None = None,
        error: Failure | None = None,
    ) -> None:
        """Set ``samstudy.status`` (terminal statuses also end the run) and any extra tags;
        ``error``: the failure's message as tags and its traceback as an artifact."""
        trial_id = self._remember(trial)
        values = dict(tags or {})
        traceback = None
        if error is not None:
            values |= {
                tag_names.ERROR: error.summary,
                tag_names.ERROR_TYPE: error.type,
                tag_names.RETRYABLE: str(error.retryable).lower(),
            }
            traceback = error.traceback or error.summary
        self.outbox.put(TrialStatus(trial_id, status, _now_ms(), values, traceback))

    def set_tags(self, trial: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Set extra tags on a trial's run (for instance the node it ran on)."""
        self.outbox.put(TrialTags(self._remember(trial), dict(tags)))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is written (True) or ``timeout`` seconds pass (False)."""
        return self.outbox.flush(timeout)

    def finish(self, status: str | None, timeout: float = 60.0) -> int:
        """End the parent run with ``status`` (``complete``, ``failed``, ``interrupted``; None
        leaves it as it is), flush, stop the writer and spool what is left.

        Returns the number of operations still pending (0 means everything reached MLflow).
        """
        if status is not None:
            self.outbox.put(EndStudy(status, _now_ms()))
        try:
            self.outbox.flush(timeout)
        except KeyboardInterrupt:  # a second Ctrl+C cuts the wait short, not the spool
            logger.warning("flush interrupted; spooling what is left")
        left = self.outbox.close()
        if left:
            # Epochs over the spool's cap are not in it (the outbox logged an error for them).
            logger.warning(
                "MLflow at %s unreachable: %d tracking operations spooled to %s; they are "
                "sent on the next `samstudy study %s`",
                redact(self.tracking_uri),
                left - len(self.outbox.not_spooled),
                self.outbox.spool_path,
                self.study,
            )
        return left

    @property
    def pending(self) -> int:
        """Operations not yet written."""
        return self.outbox.pending

    @property
    def online(self) -> bool:
        """False while the store is failing."""
        return self.outbox.online

    @property
    def dropped(self) -> list[tuple[Operation, str]]:
        """Operations the store refused for good, with its error."""
        return self.outbox.dropped

    def _remember(self, trial: Mapping[str, Any]) -> str:
        if trial["trial_id"] not in self.store.trials:
            self.store.remember(TrialInfo.from_mapping(trial))
        return trial["trial_id"]
