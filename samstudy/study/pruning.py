"""Deleting checkpoints only once Tune's saved state in the storage no longer needs them.

* A finished trial's checkpoints (``checkpoints.keep_final: false``, the default): its metrics
  are in MLflow and its checkpoints are most of a long study's disk (a ResNet-18 trial with
  momentum: ~90 MB each). They go only once Tune's own saved state, the
  ``experiment_state-*.json`` in the storage that a resume reads, records the trial as
  finished: a driver killed before that would otherwise resume the trial from a checkpoint that
  is gone.
* A running trial's older checkpoints: Tune deletes the one before its last
  ``checkpoints.keep`` as soon as it registers a newer one, but writes its state to the storage
  later (at the end of its loop step, by a background sync, which skips a round while the last
  one still runs), so for a while the state in the storage names a checkpoint that is gone, and
  a driver killed then leaves a trial that cannot resume ("does not exist on storage anymore",
  or Tune's own deletion of it failing). On S3 that lasts seconds; on a busy local disk it is
  short but real (a fresh-clone CI run killed a driver in it). :meth:`CheckpointPruner.deferring`
  holds those deletions (Tune's ``_delete_fs_path`` on the driver) until the state in the
  storage no longer names the checkpoint, so a held one outlives it by up to ``CHECK_EVERY_S``.
* What a killed driver left: a deletion it held, a finished trial it had not pruned yet.
  Neither is Tune's to redo; :meth:`CheckpointPruner.sweep` does it before a resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ray.tune import Callback

from samstudy.study.state import ExperimentFiles

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
# Tune keeps each trial's checkpoint list pickled (hex) inside its JSON state; the paths are
# plain strings in the pickle.
_HEX = re.compile(r"[0-9a-f]{40,}")


class CheckpointPruner(Callback):
    """Deletes checkpoints once Tune's saved experiment state lets it (module docstring):
    ``finished``: the ``checkpoint_*`` folders of trials recorded as ``TERMINATED``; always: the
    ones Tune deletes while it runs (see :meth:`deferring`). :meth:`prune` runs once more
    after ``fit`` (``final=True``). The deletions run in a thread of their own: on S3 each takes
    a few requests, which Tune's loop would otherwise wait for."""

    def __init__(self, files: ExperimentFiles, finished: bool = True) -> None:
        self.files = files
        self.finished = finished
        self._pending: dict[str, Any] = {}  # Tune trial id -> Tune trial, finished
        self._deferred: list[tuple[Any, str]] = []  # (filesystem, path) Tune deleted
        self._seen: tuple[str, Any, Any] | None = None  # the state file last read
        self._checked = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[Future] = []

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        if self.finished:
            self._pending[trial.trial_id] = trial

    def on_step_end(self, **info: Any) -> None:
        if (self._pending or self._deferred) and time.monotonic() - self._checked >= CHECK_EVERY_S:
            self.prune()

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """While Tune runs: its deletions of checkpoints in this experiment wait here."""
        from ray.train._internal import checkpoint_manager

        delete = getattr(checkpoint_manager, "_delete_fs_path", None)
        if delete is None:  # a Ray that deletes otherwise: its own timing
            logger.warning("this Ray's checkpoint deletions cannot be held (pruning.py)")
            yield
            return
        inside = f"{self.files.base}/"

        def held(fs: Any, fs_path: str) -> None:
            name = fs_path.rstrip("/").rpartition("/")[2]
            if fs_path.startswith(inside) and name.startswith("checkpoint_"):
                self._deferred.append((fs, fs_path))
            else:
                delete(fs=fs, fs_path=fs_path)

        checkpoint_manager._delete_fs_path = held
        try:
            yield
        finally:
            checkpoint_manager._delete_fs_path = delete

    def prune(self, final: bool = False) -> int:
        """Delete what is safe to delete now; returns the number of deletions started (trials
        or checkpoints). ``final``: read the state even if it looks unchanged (S3 times have
        whole seconds), and wait for the deletions to end."""
        started = self._prune(final)
        if final:
            for future in self._running:
                future.result()
            self._running.clear()
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
        return started

    def _prune(self, final: bool) -> int:
        self._checked = time.monotonic()
        if not self._pending and not self._deferred:
            return 0
        latest = self._latest_state()
        if latest is None or (latest == self._seen and not final):
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
        pruned = 0
        if self._pending:
            settled = set()
            for trial_json, _ in trial_data:
                record = json.loads(trial_json)
                if record.get("status") == "TERMINATED":
                    settled.add(record.get("trial_id"))
            for trial_id in sorted(settled & set(self._pending)):
                self._start(_delete_checkpoints, self._pending.pop(trial_id))
                pruned += 1
        if self._deferred:
            named = _named(text)
            for fs, path in [d for d in self._deferred if d[1].encode() not in named]:
                self._start(_delete, fs, path)
                pruned += 1
            self._deferred = [d for d in self._deferred if d[1].encode() in named]
        return pruned

    def sweep(self) -> int:
        """Before a resume, delete what a stopped driver left to delete; returns how many
        checkpoints went. Per trial folder: with ``finished``, every checkpoint of a trial the
        newest saved state records as finished; else those the state no longer names that are
        older than one it names (deletions held when the driver died). A folder where the state
        names no checkpoint is left alone: nothing there shows how it writes its paths. Any
        error leaves the rest as it is (logged): nothing here is needed to resume."""
        try:
            return self._sweep()
        except Exception:  # noqa: BLE001 - a storage hiccup must not stop the resume
            logger.warning("could not look for checkpoints a stopped driver left", exc_info=True)
            return 0

    def _sweep(self) -> int:
        import pyarrow.fs

        latest = self._latest_state()
        text = self.files.read_text(latest[0]) if latest else None
        if text is None:
            return 0
        try:
            trial_data = json.loads(text).get("trial_data", [])
        except ValueError:  # cut short (a full disk): it names nothing for sure
            return 0
        finished = set()
        for trial_json, _ in trial_data if self.finished else []:
            record = json.loads(trial_json)
            if record.get("status") == "TERMINATED" and record.get("relative_logdir"):
                finished.add(record["relative_logdir"])
        named = _named(text)
        removed = 0
        fs = self.files.fs
        for folder in fs.get_file_info(pyarrow.fs.FileSelector(self.files.base)):
            if folder.type != pyarrow.fs.FileType.Directory:
                continue
            inside = pyarrow.fs.FileSelector(folder.path, allow_not_found=True)
            checkpoints = sorted(
                entry.path
                for entry in fs.get_file_info(inside)
                if entry.type == pyarrow.fs.FileType.Directory
                and entry.base_name.startswith("checkpoint_")
            )  # Tune's names carry a zero-padded index: sorted is oldest first
            kept = [path for path in checkpoints if path.encode() in named]
            if folder.base_name in finished:
                doomed = checkpoints
            elif kept:
                doomed = [p for p in checkpoints[: checkpoints.index(kept[-1])] if p not in kept]
            else:
                doomed = []
            removed += sum(_quietly(_delete, fs, path) for path in doomed)
        return removed

    def _start(self, delete: Callable[..., None], *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="samstudy-prune")
        self._running = [f for f in self._running if not f.done()]
        self._running.append(self._executor.submit(_quietly, delete, *args))

    def _latest_state(self) -> tuple[str, Any, Any] | None:
        """Name, modification time and size of the newest ``experiment_state-*.json``."""
        import pyarrow.fs

        if not self.files.exists():
            return None
        selector = pyarrow.fs.FileSelector(self.files.base, recursive=False)
        states = [
            (info.base_name, info.mtime, info.size)
            for info in self.files.fs.get_file_info(selector)
            if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json")
        ]
        return max(states) if states else None  # names carry their session's start time


def _named(text: str) -> bytes:
    """The state's text with its pickled parts decoded: where checkpoint paths are named."""
    blobs = [bytes.fromhex(h) for h in _HEX.findall(text) if len(h) % 2 == 0]
    return b"\0".join([text.encode(), *blobs])


def _quietly(delete: Callable[..., None], *args: Any) -> bool:
    """A deletion that fails leaves a checkpoint behind, nothing worse: logged, not raised.
    Returns whether it went."""
    try:
        delete(*args)
    except Exception:  # noqa: BLE001 - the study goes on either way
        logger.warning("could not delete old checkpoints %s", args[-1], exc_info=True)
        return False
    return True


def _delete(fs: Any, path: str) -> None:
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


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
