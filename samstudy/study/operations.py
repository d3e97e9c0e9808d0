"""The typed operations of a study's MLflow tracking, and their spool records.

Each operation is one idempotent write (``samstudy.study.store`` applies it): applying one again
after a failure is always safe, which is what lets the outbox retry and spool them.
:func:`to_record` / :func:`from_record` turn an operation into the plain dict of a spool file,
``{"op": KIND, **fields}``: the format of every earlier version, whose spools still replay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class TrialInfo:
    """What creating a trial's run needs (a trial dict of the runner, typed)."""

    trial_id: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    variant_id: str = ""

    @classmethod
    def from_mapping(cls, trial: Mapping[str, Any]) -> TrialInfo:
        """From a trial dict (``TrialSpec.to_dict()``, or a spool's record of any version)."""
        trial_id = trial["trial_id"]
        return cls(
            trial_id=trial_id,
            name=trial.get("name", trial_id),
            config=dict(trial.get("config", {})),
            overrides=dict(trial.get("overrides", {})),
            variant=trial.get("variant", ""),
            variant_id=trial.get("variant_id", ""),
        )


@dataclass(frozen=True)
class MarkStudy:
    """Make the parent run (if needed) and mark it running: every start of the study.
    ``overrides`` are the study's ``--set`` assignments (the ``samstudy.set`` tag)."""

    KIND: ClassVar[str] = "study"
    overrides: tuple[str, ...] = ()
    total: int | None = None  # the study's trial count (``samstudy.trials``)


@dataclass(frozen=True)
class Purge:
    """Soft-delete the study's parent and trial runs (``--fresh``)."""

    KIND: ClassVar[str] = "purge"


@dataclass(frozen=True)
class TrialStatus:
    """Set a trial's ``samstudy.status`` (and ``tags``); a terminal status ends its run at
    ``ts`` (ms), ``interrupted`` marks it KILLED, ``running`` (re)opens it. ``traceback``, when
    given, becomes the run's ``error.txt`` artifact."""

    KIND: ClassVar[str] = "status"
    trial_id: str
    status: str
    ts: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    traceback: str | None = None


@dataclass(frozen=True)
class TrialMetrics:
    """One epoch of a trial: ``metrics`` (``epoch`` included) at step ``epoch``, time ``ts``."""

    KIND: ClassVar[str] = "metrics"
    trial_id: str
    epoch: int
    metrics: dict[str, float]
    ts: int


@dataclass(frozen=True)
class TrialTags:
    """Set tags on a trial's run (the node it ran on, for instance)."""

    KIND: ClassVar[str] = "tags"
    trial_id: str
    tags: dict[str, str]


@dataclass(frozen=True)
class EndStudy:
    """End the parent run: ``complete``, ``failed`` or ``interrupted`` at ``ts`` (ms)."""

    KIND: ClassVar[str] = "study_end"
    status: str
    ts: int


Operation = MarkStudy | Purge | TrialStatus | TrialMetrics | TrialTags | EndStudy
_KINDS: dict[str, type] = {
    cls.KIND: cls for cls in (MarkStudy, Purge, TrialStatus, TrialMetrics, TrialTags, EndStudy)
}


def to_record(op: Operation) -> dict[str, Any]:
    """The spool's plain dict of an operation: ``{"op": KIND, **fields}``."""
    return {"op": op.KIND, **dataclasses.asdict(op)}


def from_record(record: Mapping[str, Any]) -> Operation:
    """The operation of a spool record; ``ValueError`` for one this version does not know."""
    kind = record.get("op")
    cls = _KINDS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown tracking operation {kind!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in known and v is not None}
    if "overrides" in values:
        values["overrides"] = tuple(values["overrides"])
    return cls(**values)


def trial_id_of(op: Operation) -> str | None:
    """The trial an operation writes to (None for study-level operations)."""
    return getattr(op, "trial_id", None)
