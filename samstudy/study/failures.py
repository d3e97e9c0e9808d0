"""Why a trial failed, and whether trying again can help.

A trial that raises sends its error to the driver before the exception leaves the worker (the
``ERROR`` key of one last Tune result, see :mod:`samstudy.study.worker`): the error raised
inside the trial, not Ray's wrapper, with its traceback and a verdict on retrying. Tune decides
about a retry only from ``trial.max_failures``, right after the error arrives and with no hook
in between, so ``callbacks.FailureBook`` (the driver callback that sees the result first) sets
it to 0 for an error that cannot succeed on retry. This module imports no Ray: workers use it.

Errors that cannot succeed on retry (``retryable`` False): any error raised before the trial's
first epoch of this attempt ended that is a configuration, data or shape error (``ValueError``,
``TypeError``, ``LookupError``, ``FileNotFoundError`` and their kin, such as
``DataNotFoundError`` and pydantic's ``ValidationError``), and an out-of-memory error at the
first step. Everything else, and any error once training is under way, keeps Tune's retries
from the last checkpoint.
"""

from __future__ import annotations

import errno
import pickle
import re
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from samstudy.paths import redact

ERROR = "_error"  # result key of the error record (``_``: never logged as a metric)
# Deterministic set-up errors: the same config on the same data raises them again.
_SETUP_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    NotImplementedError,
    ImportError,
    AttributeError,
)
# A storage that cannot take a write: no retry helps until a person frees space or remounts it.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
_ERRNOS = "|".join(str(n) for n in _STORAGE_ERRNOS)
_STORAGE_TEXT = re.compile(
    rf"\[Errno ({_ERRNOS})\]|No space left on device|Read-only file system|Disk quota exceeded"
)
MESSAGE_CHARS = 2000  # of an error message in a tag or a console line (MLflow tags: 8000)


@dataclass(frozen=True)
class Failure:
    """One failure of one trial attempt."""

    type: str  # the exception's class name, e.g. ``DataNotFoundError``
    message: str
    traceback: str = ""
    retryable: bool = True
    epoch: int | None = None  # the last epoch the attempt finished (None: none)
    error_file: str = ""  # Tune's error.txt of the trial, where known
    storage: bool = False  # the study's storage is full or read-only (see StorageFault)

    @property
    def summary(self) -> str:
        """``Type: message`` on one line, cut to :data:`MESSAGE_CHARS`."""
        text = f"{self.type}: {' '.join(self.message.split())}"
        return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a Tune result, the state file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Failure:
        """Back from :meth:`to_dict`; unknown keys ignored."""
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


class StorageFault(RuntimeError):
    """The study's storage path cannot be written (full, read-only, over quota): the study
    stops, resumable, instead of failing trial after trial."""


def is_storage_error(error: BaseException | str) -> bool:
    """An error (or an error's text) that says the storage is full or read-only."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return True
    return bool(_STORAGE_TEXT.search(str(error)))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA/MPS out-of-memory errors and Python's ``MemoryError`` (torch not imported
    here: this module is on the driver)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def is_retryable(exc: BaseException, started: bool) -> bool:
    """Whether a retry of the trial could succeed (see the module docstring)."""
    if is_storage_error(exc):
        return False  # the study stops (StorageFault); a rerun resumes the trial
    if started:
        return True
    if is_out_of_memory(exc):
        return False
    return not isinstance(exc, _SETUP_ERRORS)


def describe(exc: BaseException, epoch: int | None = None) -> Failure:
    """The :class:`Failure` of ``exc`` raised in a trial whose last finished epoch is ``epoch``
    (None: it failed before finishing one in this attempt)."""
    # Redacted here, where the error is first put in words: it goes to MLflow tags, the console
    # and the state file, and may quote a tracking or storage URI with its password.
    return Failure(
        type=type(exc).__name__,
        message=redact(str(exc) or repr(exc)),
        traceback=redact("".join(traceback.format_exception(exc))),
        retryable=is_retryable(exc, epoch is not None),
        epoch=epoch,
        storage=is_storage_error(exc),
    )


def error_file(trial: Any) -> str:
    """Where Tune keeps a trial's ``error.txt`` in the study's storage (Tune writes it on the
    driver first and copies it there with the experiment's state)."""
    path = getattr(trial, "path", None)
    return f"{path}/error.txt" if path else str(trial.error_file or "")


def from_tune_error(trial: Any) -> Failure:
    """The failure of a trial that sent none (its worker died, or the error could not be
    sent), from what Tune stored: the pickled error's cause, else its text."""
    where = error_file(trial)
    exc = _tune_error(trial)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        failure = describe(cause)
        return Failure(**{**failure.to_dict(), "retryable": True, "error_file": where})
    if exc is not None and type(exc).__name__ in ("RayActorError", "ActorDiedError"):
        message = "the trial's worker process died (killed, out of host memory, or crashed)"
        return Failure("WorkerDied", message, str(exc), True, None, where)
    text = str(_tune_error(trial, pickled=False) or "")
    last = [line for line in redact(text or exc or "").splitlines() if line.strip()]
    message = last[-1] if last else "unknown error (no error record; see Ray's logs)"
    return Failure("TrialError", message, redact(text), True, None, where)


def _tune_error(trial: Any, pickled: bool = True) -> Any:
    """Tune's record of a trial's last error (the pickled exception, else its text), read from
    the driver's own copy first: Tune writes it there before the callbacks run and copies it to
    the storage with its next state sync, so the storage's copy is often not there yet (a failed
    restore then read "unknown error"). None when neither can be read."""
    local = getattr(trial, "pickled_error_file" if pickled else "error_file", None)
    try:
        if local and Path(local).is_file():
            if not pickled:
                return Path(local).read_text(errors="replace")
            with open(local, "rb") as stream:  # Tune wrote it (cloudpickle) on this driver
                return pickle.load(stream)
        return trial.get_pickled_error() if pickled else trial.get_error()
    except Exception:  # noqa: BLE001 - unreadable: the caller falls back to less
        return None


def failure_table(rows: list[tuple[str, Failure]], width: int = 160) -> str:
    """The failed trials and their reasons, one line each (``name``, ``Type: message``)."""
    if not rows:
        return ""
    name_w = min(48, max(len(name) for name, _ in rows))
    lines = [f"{'trial':<{name_w}}  reason"]
    for name, failure in rows:
        reason = failure.summary if failure.retryable else f"[not retried] {failure.summary}"
        cut = width - name_w - 2
        if len(reason) > cut:
            reason = reason[: cut - 3] + "..."
        lines.append(f"{name[:name_w]:<{name_w}}  {reason}")
    return "\n".join(lines)
