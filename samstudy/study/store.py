"""A study's MLflow store: typed operations, each idempotent, written synchronously.

Long because every operation's lookup-before-write (what makes it safe to apply again) sits
beside the request it guards; split up, the idempotence of each write could not be read at once.

Layout (docs/architecture.md): one experiment per study, one parent run per study and one child
run per trial. Runs are found by their tags (``samstudy.tags``) in the study's experiment: one
search for all of a study's runs when the store starts (again after a failed write of a trial), so
a retried trial or a resumed study logs into the same run. Metrics use ``step = epoch``; an
epoch already in MLflow is skipped, so a trial that re-reports from an older checkpoint adds no
duplicate steps; params are logged once per run.

Because every operation (``samstudy.study.operations``) looks the store up before it writes,
applying one again after a failure is always safe: :class:`samstudy.study.outbox.Outbox`
retries them in the background.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import samstudy
from samstudy import tags
from samstudy.identity import mlflow_params
from samstudy.study.operations import (
    EndStudy,
    MarkStudy,
    Operation,
    Purge,
    TrialInfo,
    TrialMetrics,
    TrialStatus,
    TrialTags,
    trial_id_of,
)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit (it splits larger calls itself)
# Error codes that retrying cannot fix: the operation is dropped (and reported) instead.
_PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
)
_PAGE = 1000  # runs per search_runs page


@dataclass(frozen=True)
class StudyInfo:
    """What the parent run and every trial run of a study are tagged with."""

    name: str
    experiment: str
    sha256: str = ""
    description: str = ""
    git_commit: str = "unknown"


def is_permanent(exc: BaseException) -> bool:
    """True for an MLflow refusal that retrying cannot fix (a bad metric name, ...)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (MLflow's default is ``./mlruns``
    in whatever folder the study happened to start from); a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :])
    return (database.parent / "mlartifacts" / experiment).as_uri()


def _run_tags(values: Mapping[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items()]


class MlflowStore:
    """Writes a study's operations to MLflow, synchronously; not thread-safe (one writer).

    ``trials`` holds every trial an operation may name (its run is created from it). The
    run ids and last logged epochs are cached, rebuilt from MLflow after :meth:`forget`.
    """

    def __init__(self, tracking_uri: str, study: StudyInfo) -> None:
        self.tracking_uri = tracking_uri
        self.study = study
        self.trials: dict[str, TrialInfo] = {}
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: Any = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_epoch: dict[str, float] = {}
        self._with_params: set[str] = set()  # trial ids whose run has its params
        # Trials forgotten after a failed write: their run may exist although the study's scan
        # (``_ensure_study``) did not see it, so they are looked up again before a run is made.
        self._unsure: set[str] = set()

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (made on first use: importing MLflow takes a second)."""
        if self._client is None:
            # MLflow's own retries would hold the writer for minutes per call on a dead server;
            # the outbox retries by itself. One "View run at" line per finished run is noise.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def remember(self, trial: TrialInfo) -> None:
        """Know ``trial`` (the first record of a trial id wins)."""
        self.trials.setdefault(trial.trial_id, trial)

    def apply(self, op: Operation) -> None:
        """Write one operation."""
        match op:
            case Purge():
                self._purge()
            case MarkStudy():
                self._mark_study_running(op)
            case TrialMetrics() | TrialStatus() | TrialTags():
                self.write_trial([op])
            case EndStudy():
                self._end_study(op)

    def write_trial(self, ops: Sequence[Operation]) -> None:
        """Adjacent operations of one trial (tags and epochs, at most one status, last) in the
        fewest requests: the tags, a status's included, go with the epochs' last ``log_batch``
        (after the epochs: a run never says ``completed`` while missing some), or with the
        run's creation when there are no epochs; then the status ends (or reopens) the run. A
        short trial's result and end take two requests instead of four."""
        status = ops[-1] if isinstance(ops[-1], TrialStatus) else None
        values: dict[str, str] = {}
        for op in ops:
            if isinstance(op, TrialTags):
                values.update(op.tags)
        if status is not None:
            values.update({tags.STATUS: status.status, **status.tags})
        epochs = [op for op in ops if isinstance(op, TrialMetrics)]
        if epochs:
            run_id, created = self.log_epochs(epochs, values)
        else:
            run_id, created = self._ensure_trial(str(trial_id_of(ops[0])), values)
        if status is not None:
            self._end_status(status, run_id, created)

    def log_epochs(
        self, ops: Sequence[TrialMetrics], run_tags: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """Log epochs of one trial, skipping logged ones, in as few ``log_batch`` calls as
        MLflow's limit allows, without splitting an epoch unless it alone is over the limit;
        the tags ``run_tags`` go with the last (MLflow writes a batch's metrics before its
        tags). Returns ``(run_id, created)``."""
        from mlflow.entities import Metric

        trial_id = ops[0].trial_id
        run_id, created = self._ensure_trial(trial_id)
        extra = _run_tags(run_tags or {})
        limit = MAX_METRICS_PER_BATCH - len(extra)  # so MLflow does not split the last call
        batch: list[Metric] = []
        batch_last: int | None = None

        def send(last: bool = False) -> None:
            if batch or (last and extra):
                self.client.log_batch(run_id, metrics=list(batch), tags=extra if last else [])
            if batch_last is not None:
                self._last_epoch[trial_id] = float(batch_last)
            batch.clear()

        for op in ops:
            if op.epoch <= max(self._last_epoch.get(trial_id, 0.0), batch_last or 0):
                continue  # a retried or resumed trial re-reporting an epoch MLflow already has
            values = dict(op.metrics)
            # `epoch` goes last: it is the marker of a logged step, so it must not precede the
            # rest (an epoch is never split across calls unless it alone is over the limit).
            last = values.pop("epoch")
            metrics = [Metric(k, v, op.ts, op.epoch) for k, v in values.items()]
            metrics.append(Metric("epoch", last, op.ts, op.epoch))
            if batch and len(batch) + len(metrics) > limit:
                send()
            batch.extend(metrics)
            batch_last = op.epoch
        send(last=True)
        return run_id, created

    def forget(self, op: Operation) -> None:
        """After a failure nobody knows what reached the store: look it up again next time."""
        trial_id = trial_id_of(op)
        if trial_id is not None:
            self._runs.pop(trial_id, None)
            self._last_epoch.pop(trial_id, None)
            self._unsure.add(trial_id)
        if isinstance(op, MarkStudy | Purge):
            self.experiment_id = None
            self.parent_run_id = None

    # -- runs ----------------------------------------------------------------------------------

    def _search(self, filter_string: str, order_by: list[str] | None = None) -> list:
        """Every active run of the study's experiment matching ``filter_string`` (all pages)."""
        from mlflow.utils import get_results_from_paginated_fn

        def page(max_results: int, token: str | None) -> Any:
            return self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                order_by=order_by,
                max_results=max_results,
                page_token=token,
            )

        return get_results_from_paginated_fn(page, _PAGE)

    def _ensure_experiment(self) -> str:
        if self.experiment_id is None:
            client = self.client
            experiment = client.get_experiment_by_name(self.study.experiment)
            if experiment is None:
                self.experiment_id = client.create_experiment(
                    self.study.experiment,
                    artifact_location=_artifact_location(self.tracking_uri, self.study.experiment),
                    # a model-training experiment: MLflow 3's UI opens it on the runs table
                    tags={
                        tags.STUDY: self.study.name,
                        tags.EXPERIMENT_KIND: tags.KIND_MODEL_TRAINING,
                    },
                )
            else:
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment.experiment_id)
                self.experiment_id = experiment.experiment_id
                if tags.EXPERIMENT_KIND not in experiment.tags:  # a study from before the tag
                    client.set_experiment_tag(
                        self.experiment_id, tags.EXPERIMENT_KIND, tags.KIND_MODEL_TRAINING
                    )
        return self.experiment_id

    def _study_filter(self, role: str) -> str:
        return f"tags.`{tags.ROLE}` = '{role}' and tags.`{tags.STUDY}` = '{self.study.name}'"

    def _ensure_study(self) -> str:
        if self.parent_run_id is not None:
            return self.parent_run_id
        exp_id = self._ensure_experiment()
        found = self.client.search_runs(
            [exp_id],
            filter_string=self._study_filter(tags.ROLE_PARENT),
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            values = {
                tags.ROLE: tags.ROLE_PARENT,
                tags.STUDY: self.study.name,
                tags.SHA: self.study.sha256,
                tags.GIT: self.study.git_commit,
                tags.VERSION: samstudy.__version__,
                tags.STATUS: "running",
            }
            if self.study.description:
                values[tags.NOTE] = self.study.description
            run = self.client.create_run(exp_id, run_name=self.study.name, tags=values)
            run_id = run.info.run_id
        # One paged search for every trial run of the study (not one lookup per trial); oldest
        # last, so the oldest run of a trial id wins. Trials are not looked up one by one after
        # it, so the study counts as found only once the search succeeded.
        trials = self._search(self._study_filter(tags.ROLE_TRIAL), ["attributes.start_time DESC"])
        for trial_run in trials:
            self._cache_run(trial_run)
        self._unsure.clear()
        self.parent_run_id = run_id
        return run_id

    def _mark_study_running(self, op: MarkStudy) -> None:
        run_id = self._ensure_study()
        values = {
            tags.SHA: self.study.sha256,
            tags.GIT: self.study.git_commit,
            tags.STATUS: "running",
        }
        if op.overrides:
            values[tags.SET] = json.dumps(list(op.overrides))
        if op.total:
            values[tags.TOTAL] = str(op.total)
        self.client.log_batch(run_id, tags=_run_tags(values))
        self.client.update_run(run_id, status="RUNNING")

    def _cache_run(self, run: Any) -> None:
        trial_id = run.data.tags.get(tags.TRIAL_ID)
        if trial_id is None:
            return
        self._runs[trial_id] = run.info.run_id
        self._last_epoch[trial_id] = run.data.metrics.get("epoch", 0.0)
        if run.data.params:
            self._with_params.add(trial_id)

    def _purge(self) -> None:
        """Soft-delete the parent and trial runs of the study (``mlflow gc`` removes them)."""
        experiment = self.client.get_experiment_by_name(self.study.experiment)
        if experiment is None:
            return
        self.experiment_id = experiment.experiment_id
        for run in self._search(f"tags.`{tags.STUDY}` = '{self.study.name}'"):
            self.client.delete_run(run.info.run_id)
        self._runs.clear()
        self._last_epoch.clear()
        self._with_params.clear()
        self.parent_run_id = None

    def _ensure_trial(
        self, trial_id: str, values: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """The run of ``trial_id`` with its params and the tags ``values``; made if missing.

        Returns ``(run_id, created)``: a run made here is already RUNNING. Each store request
        costs 4-20 ms of the driver's CPU on sqlite, which a small machine takes from its trials,
        so a new trial's run takes two: ``create_run`` with every tag, one ``log_batch`` of
        params.
        """
        parent = self._ensure_study()
        run_id = self._runs.get(trial_id)
        if run_id is None and trial_id in self._unsure:
            # A failed request may still have made the run: look it up before making another.
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`{tags.TRIAL_ID}` = '{trial_id}' and tags.`{tags.ROLE}` = 'trial'"
                ),
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:
                self._cache_run(found[0])
                run_id = self._runs[trial_id]
            self._unsure.discard(trial_id)
        trial = self.trials.get(trial_id, TrialInfo(trial_id, trial_id))
        created = run_id is None
        if run_id is None:
            run_id = self._create_trial_run(trial, parent, values or {})
        params = []
        if trial_id not in self._with_params and trial.config:
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in mlflow_params(trial.config).items()]
        run_tags = [] if created or not values else _run_tags(values)
        if params or run_tags:
            # MLflow splits the call at its limit of params per batch; the same values again
            # (a run whose params were half logged) are accepted.
            self.client.log_batch(run_id, params=params, tags=run_tags)
        if params:
            self._with_params.add(trial_id)
        return run_id, created

    def _create_trial_run(self, trial: TrialInfo, parent: str, extra: Mapping[str, str]) -> str:
        values = {
            tags.ROLE: tags.ROLE_TRIAL,
            tags.STUDY: self.study.name,
            tags.TRIAL_ID: trial.trial_id,
            tags.SHA: self.study.sha256,
            tags.GIT: self.study.git_commit,
            tags.VERSION: samstudy.__version__,
            tags.STATUS: "running",
            tags.PARENT: parent,
            tags.OVERRIDES: json.dumps(trial.overrides, sort_keys=True)[:5000],
        }
        if trial.variant_id:
            values[tags.VARIANT] = trial.variant
            values[tags.VARIANT_ID] = trial.variant_id
        values.update({k: str(v) for k, v in extra.items()})
        run = self.client.create_run(self.experiment_id, run_name=trial.name, tags=values)
        self._runs[trial.trial_id] = run.info.run_id
        self._last_epoch[trial.trial_id] = 0.0
        return run.info.run_id

    def _end_status(self, op: TrialStatus, run_id: str, created: bool) -> None:
        """What a status does to the run once its tags are there."""
        if op.traceback:  # log_text overwrites: applying the operation again is safe
            self.client.log_text(run_id, op.traceback, tags.ERROR_ARTIFACT)
        if op.status in tags.TERMINAL_STATUSES:
            mlflow_status = "FAILED" if op.status == "failed" else "FINISHED"
            self.client.set_terminated(run_id, status=mlflow_status, end_time=op.ts)
        elif op.status == tags.INTERRUPTED:
            self.client.set_terminated(run_id, status="KILLED", end_time=op.ts)
        elif op.status == "running" and not created:  # a new run starts RUNNING
            self.client.update_run(run_id, status="RUNNING")

    def _end_study(self, op: EndStudy) -> None:
        run_id = self._ensure_study()
        self.client.log_batch(run_id, tags=_run_tags({tags.STATUS: op.status}))
        if op.status in {"complete", "failed"}:
            mlflow_status = "FINISHED" if op.status == "complete" else "FAILED"
            self.client.set_terminated(run_id, status=mlflow_status, end_time=op.ts)
        else:  # interrupted: a later `samstudy study` resumes it and marks it RUNNING again
            self.client.set_terminated(run_id, status="KILLED", end_time=op.ts)
