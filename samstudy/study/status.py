"""``samstudy status NAME``: where a study stands, read from MLflow alone.

Any shell that reaches the tracking store can ask, a laptop included: trials pending, running,
done, failed, diverged; each running trial's epoch out of its epochs and its node; each failed
trial's error; and an ETA from the measured epoch times (:func:`eta_seconds`, which the
driver's live view uses too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from samstudy import tags


@dataclass
class TrialState:
    """One trial run as MLflow has it."""

    name: str
    status: str
    epoch: int | None = None
    epochs: int | None = None
    epoch_time: float | None = None  # seconds, the latest measured
    node: str = ""
    error: str = ""
    seconds: float | None = None  # wall time of a finished trial


@dataclass
class StudyStatus:
    """A study's state: counts by status, the trials, the ETA."""

    name: str
    study_status: str
    total: int | None
    counts: dict[str, int] = field(default_factory=dict)
    trials: list[TrialState] = field(default_factory=list)
    eta_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain values for ``--json``."""
        return asdict(self)


def eta_seconds(
    running: Sequence[tuple[int, int, float]],
    pending: int,
    trial_seconds: float | None,
    slots: int,
) -> float | None:
    """Seconds left: the running trials' remaining epochs at their epoch time, plus the pending
    trials at ``trial_seconds`` each (the finished ones' mean, else the running ones' epochs
    times epoch time), over ``slots`` trials at once; None when nothing has been measured."""
    left = sum(max(0, total - epoch) * each for epoch, total, each in running)
    if pending:
        if trial_seconds is None and running:
            trial_seconds = sum(total * each for _, total, each in running) / len(running)
        if trial_seconds is None:
            return None
        left += pending * trial_seconds
    if not running and not pending:
        return 0.0
    return left / max(1, slots)


def study_status(uri: str, experiment: str, name: str) -> StudyStatus:
    """The study's state from MLflow (:class:`LookupError` when it has no experiment there)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"MLflow at {uri} has no experiment {experiment!r}: not started yet?")
    runs = client.search_runs([found.experiment_id], max_results=50000)
    parent = [r for r in runs if r.data.tags.get(tags.ROLE) == tags.ROLE_PARENT]
    trials = [r for r in runs if r.data.tags.get(tags.ROLE) == tags.ROLE_TRIAL]
    total_tag = parent[0].data.tags.get(tags.TOTAL) if parent else None
    status = StudyStatus(
        name=name,
        study_status=parent[0].data.tags.get(tags.STATUS, "?") if parent else "?",
        total=int(total_tag) if total_tag and total_tag.isdigit() else None,
    )
    for run in trials:
        t, m, p = run.data.tags, run.data.metrics, run.data.params
        state = TrialState(name=run.info.run_name or t.get(tags.TRIAL_ID, "?"), status=t.get(
            tags.STATUS, "running" if run.info.status == "RUNNING" else "?"
        ))  # fmt: skip
        if "epoch" in m:
            state.epoch = int(m["epoch"])
        if p.get("epochs", "").isdigit():
            state.epochs = int(p["epochs"])
        if m.get("epoch_time") is not None and math.isfinite(m["epoch_time"]):
            state.epoch_time = float(m["epoch_time"])
        state.node = t.get(tags.HOSTNAME) or t.get(tags.NODE_IP) or ""
        state.error = t.get(tags.ERROR, "")
        if run.info.end_time and run.info.start_time and state.status in tags.DONE_STATUSES:
            state.seconds = (run.info.end_time - run.info.start_time) / 1000
        status.trials.append(state)
        status.counts[state.status] = status.counts.get(state.status, 0) + 1
    known = len(trials)
    if status.total is not None and status.total > known:
        status.counts["pending"] = status.total - known
    running = [
        (t.epoch or 0, t.epochs, t.epoch_time)
        for t in status.trials
        if t.status == "running" and t.epochs and t.epoch_time
    ]
    finished = [t.seconds for t in status.trials if t.seconds]
    pending = status.counts.get("pending", 0) + status.counts.get(tags.INTERRUPTED, 0)
    slots = max(1, status.counts.get("running", 0))
    mean = sum(finished) / len(finished) if finished else None
    status.eta_s = eta_seconds(running, pending, mean, slots)
    return status


def format_status(status: StudyStatus) -> str:
    """What ``samstudy status`` prints."""
    order = ("pending", "running", "completed", "diverged", "stopped", "failed", "interrupted")
    counts = ", ".join(f"{status.counts[k]} {k}" for k in order if status.counts.get(k))
    total = f" of {status.total}" if status.total else ""
    eta = "" if status.eta_s is None else f"; ETA {duration(status.eta_s)}"
    lines = [
        f"study {status.name} ({status.study_status}): {counts or 'no trials yet'}{total}{eta}"
    ]
    for t in sorted(status.trials, key=lambda t: t.name):
        if t.status == "running":
            at = f"epoch {t.epoch if t.epoch is not None else 0}/{t.epochs or '?'}"
            each = f", {t.epoch_time:.1f} s/epoch" if t.epoch_time else ""
            lines.append(f"  running   {t.name}  {at}{each}  on {t.node or '?'}")
    for t in sorted(status.trials, key=lambda t: t.name):
        if t.status == "failed":
            lines.append(f"  failed    {t.name}  {t.error or '(no error recorded)'}")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
