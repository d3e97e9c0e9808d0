"""Stopping a running study from any shell: ``samstudy stop NAME``.

The driver keeps a small record in its experiment folder (``samstudy_driver.json``: host, pid,
a heartbeat every few seconds) and watches for a stop request there (``samstudy_stop``), so a
shell on any machine that sees the study's storage (a shared folder or a URI) can stop it.
On a request every running trial saves a checkpoint at the end of its current epoch (the
workers watch the same request file, :class:`~samstudy.study.worker.StopWatch`); once each has
(or after ``STOP_GRACE_S``), the driver stops as on Ctrl+C: Tune saves its state, the running
trials are marked ``interrupted`` in MLflow (resumable, not FAILED) and ``make study NAME=...``
resumes them from those checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

from ray.tune import Callback

from samstudy.study.state import ExperimentFiles

DRIVER_FILE = "samstudy_driver.json"
STOP_FILE = "samstudy_stop"
HEARTBEAT_S = 5.0
ALIVE_S = 60.0  # a driver whose heartbeat is older than this is taken for gone
# How long a stopping driver waits for the running trials' checkpoints (about one epoch each).
STOP_GRACE_S = float(os.environ.get("SAMSTUDY_STOP_GRACE_S", "300"))


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised through Tune when the driver cannot interrupt it by its own signal handler."""


def request_stop(files: ExperimentFiles) -> str:
    """Ask the study's driver to stop; returns what happened, in one line for the user."""
    driver = read_driver(files)
    if files.exists(STOP_FILE):
        return "a stop was already requested; the driver is stopping (`samstudy status` shows it)"
    if driver is None or time.time() - float(driver.get("heartbeat", 0)) > ALIVE_S:
        return "no driver is running this study (nothing to stop)"
    files.write_text(STOP_FILE, json.dumps({"by": f"{socket.gethostname()}", "at": time.time()}))
    return (
        f"stop requested: the driver on {driver.get('host')} (pid {driver.get('pid')}) lets "
        "each running trial save a checkpoint at the end of its epoch, saves the study's state "
        "and exits; the next `samstudy study` resumes the trials from there"
    )


def read_driver(files: ExperimentFiles) -> dict[str, Any] | None:
    """The running driver's record, None when there is none."""
    try:
        text = files.read_text(DRIVER_FILE)
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


class DriverControl(Callback):
    """The driver's side: heartbeat in the experiment folder, and the stop request watch."""

    def __init__(self, files: ExperimentFiles) -> None:
        self.files = files
        self.started = time.time()
        self._beat = 0.0
        self.stopping = False
        self._pending: set[str] = set()  # running trials without a checkpoint since the request
        self._deadline = 0.0
        self._interrupted = False
        try:
            files.delete_file(STOP_FILE)  # a request left from an earlier run is not for this
        except OSError:
            pass
        self._write()

    def _write(self) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
        }
        self._beat = time.monotonic()
        try:
            self.files.write_text(DRIVER_FILE, json.dumps(record))
        except OSError:  # a full or read-only storage: the study's own writes report it
            pass

    def on_step_end(self, iteration: int = 0, trials: Any = (), **info: Any) -> None:
        if self.stopping:
            if not self._pending or time.monotonic() > self._deadline:
                self._interrupt()
            return
        if time.monotonic() - self._beat < HEARTBEAT_S:
            return
        self._write()
        try:
            requested = self.files.exists(STOP_FILE)
        except OSError:
            requested = False
        if not requested:
            return
        self.stopping = True
        self._pending = {t.trial_id for t in trials if t.status == "RUNNING"}
        self._deadline = time.monotonic() + STOP_GRACE_S
        if not self._pending:
            self._interrupt()

    def on_checkpoint(self, iteration: int, trials: Any, trial: Any, checkpoint: Any, **info: Any):
        self._pending.discard(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
        self._pending.discard(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
        self._pending.discard(trial.trial_id)

    def _interrupt(self) -> None:
        if self._interrupted:
            return
        self._interrupted = True
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's own: it ends the run after saving its state
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise StopRequested("stop requested by `samstudy stop`")

    def close(self) -> None:
        """The driver is leaving: no record, no pending request."""
        for name in (DRIVER_FILE, STOP_FILE):
            try:
                self.files.delete_file(name)
            except OSError:  # a read-only storage: `stop` then sees an old heartbeat
                pass
