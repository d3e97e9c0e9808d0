"""Deleting a finished trial's checkpoints (``checkpoints.keep_final: false``, the default).

A finished trial's metrics are in MLflow and its checkpoints are most of a long study's disk
(a ResNet-18 trial with momentum: ~90 MB each). They go only once Tune's own saved state, the
``experiment_state-*.json`` in the storage that a resume reads, records the trial as finished:
a driver killed before that would otherwise resume the trial from a checkpoint that is gone.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ray.tune import Callback

from samstudy.study.state import ExperimentFiles

CHECK_EVERY_S = 5.0


class CheckpointPruner(Callback):
    """Deletes the ``checkpoint_*`` folders of trials that finished and that Tune's saved
    experiment state records as ``TERMINATED``; :meth:`prune` runs once more after ``fit``."""

    def __init__(self, files: ExperimentFiles) -> None:
        self.files = files
        self._pending: dict[str, Any] = {}  # Tune trial id -> Tune trial, finished
        self._seen: tuple[str, Any] | None = None  # the state file last read, and its mtime
        self._checked = 0.0

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._pending[trial.trial_id] = trial

    def on_step_end(self, **info: Any) -> None:
        if self._pending and time.monotonic() - self._checked >= CHECK_EVERY_S:
            self.prune()

    def prune(self) -> int:
        """Delete what is safe to delete now; returns the number of trials pruned."""
        self._checked = time.monotonic()
        if not self._pending:
            return 0
        latest = self._latest_state()
        if latest is None or latest == self._seen:  # Tune rewrites one file per session
            return 0
        self._seen = latest
        text = self.files.read_text(latest[0])
        if text is None:
            return 0
        try:
            trial_data = json.loads(text).get("trial_data", [])
        except ValueError:  # caught while Tune rewrites it: read it again next time
            self._seen = None
            return 0
        settled = set()
        for trial_json, _ in trial_data:
            record = json.loads(trial_json)
            if record.get("status") == "TERMINATED":
                settled.add(record.get("trial_id"))
        pruned = 0
        for trial_id in sorted(settled & set(self._pending)):
            _delete_checkpoints(self._pending.pop(trial_id))
            pruned += 1
        return pruned

    def _latest_state(self) -> tuple[str, Any] | None:
        """Name and modification time of the newest ``experiment_state-*.json``."""
        import pyarrow.fs

        if not self.files.exists():
            return None
        selector = pyarrow.fs.FileSelector(self.files.base, recursive=False)
        states = [
            (info.base_name, info.mtime)
            for info in self.files.fs.get_file_info(selector)
            if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json")
        ]
        return max(states) if states else None  # names carry their session's start time


def _delete_checkpoints(trial: Any) -> None:
    import pyarrow.fs

    storage = getattr(trial, "storage", None)
    if storage is None or not trial.path:
        return
    fs = storage.storage_filesystem
    selector = pyarrow.fs.FileSelector(trial.path, allow_not_found=True)
    for entry in fs.get_file_info(selector):
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(
            "checkpoint_"
        ):
            fs.delete_dir(entry.path)
