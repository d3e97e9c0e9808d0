"""What a study run ended with, and the exit status of ``samstudy study`` that says it."""

from __future__ import annotations

from dataclasses import dataclass, field

from samstudy.study.failures import Failure

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_TRACKING = 3
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 130
# What each exit status of `samstudy study` means (the CLI's help and docs/running.md list it).
EXIT_CODES = {
    EXIT_OK: "every trial ended (completed, diverged or stopped) and MLflow has everything",
    EXIT_FAILED: "some trials failed (after their retries, or at once when retrying cannot help)",
    EXIT_INVALID: "invalid study or set-up (study file, cluster address, storage, tracking URI)",
    EXIT_TRACKING: "every trial ended but MLflow is incomplete: operations are spooled",
    EXIT_STORAGE: "the storage path is full or read-only; the study stopped, resumable",
    EXIT_INTERRUPTED: "interrupted (Ctrl+C, `samstudy stop`); run it again to resume",
}


@dataclass
class StudyResult:
    """What ``run_study`` did.

    ``status``: ``complete`` (every trial ended completed / diverged / stopped), ``failed``
    (every trial ended, some failed after all retries), ``interrupted`` (stopped before the end),
    ``storage_fault`` (stopped: the storage cannot be written; ``message`` says what to do) or
    ``already_complete`` (nothing was started).
    """

    name: str
    status: str
    experiment_path: str
    tracking_uri: str
    trials: dict[str, str] = field(default_factory=dict)  # trial id -> status
    wall_s: float = 0.0
    tracking_pending: int = 0  # tracking operations spooled because MLflow was unreachable
    # trial name -> its failure, for the trials that failed for good in this run
    failures: dict[str, Failure] = field(default_factory=dict)
    message: str = ""  # why the study stopped, for a ``storage_fault``
    stopped: bool = False  # by `samstudy stop`

    @property
    def exit_code(self) -> int:
        """The exit status of ``samstudy study`` (see :data:`EXIT_CODES`)."""
        if self.status == "storage_fault":
            return EXIT_STORAGE
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        if self.status == "failed":
            return EXIT_FAILED
        return EXIT_TRACKING if self.tracking_pending else EXIT_OK

    @property
    def ok(self) -> bool:
        """True when the study is complete (now or before)."""
        return self.status in ("complete", "already_complete")
