"""Run a study with Ray Tune: one Tune trial per expanded trial, tracked in MLflow from the driver.

Long because ``run_study`` is the one place where a study's pieces meet (state, growth segments,
tracking, callbacks, Tune's new run or restore, faults and the final outcome), kept in reading
order rather than split into helpers that each need all of it.

``run_study(spec)`` is what ``samstudy study NAME`` calls. It wires the study package together:

* ``searchspace``: grid studies become a ``tune.grid_search`` over the expanded trials; search
  studies sample ``overrides`` with Optuna (TPE or random) through ``OptunaSearch``, optionally
  with ASHA early stopping (the Tune config is made here);
* ``worker``: the trainable each Tune trial runs in a Ray worker; ``FailureConfig(max_failures)``
  retries a failed trial from its last checkpoint;
* ``state``: the Ray experiment lives in ``<storage_path>/<study name>`` (default
  ``<project>/results/ray/NAME``). Running a study again resumes it (``Tuner.restore``,
  unfinished and errored trials continued); a complete study starts nothing; ``fresh=True``
  deletes the Ray experiment and soft-deletes the study's MLflow runs first. On a URI Tune gets
  the storage's filesystem (``storage``: an S3 endpoint, no keys) and paths on it;
* ``callbacks`` on the driver: MLflow tracking (``tracking.StudyTracker``), the per-trial
  outcome file that decides completeness, and a compact live view.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from samstudy import tags
from samstudy.identity import config_trial_id
from samstudy.paths import project_root, redact
from samstudy.settings import tracking_target
from samstudy.study import callbacks as _callbacks
from samstudy.study.callbacks import (
    FailureBook,
    OutcomeCallback,
    TrackingCallback,
    TrialResolver,
    dispatching,
    run_config_callbacks,
)
from samstudy.study.cluster import check_storage, init_ray
from samstudy.study.control import DriverControl
from samstudy.study.failures import StorageFault, is_storage_error
from samstudy.study.preflight import (
    environment_problems,
    raise_if,
    static_problems,
    storage_problem,
)
from samstudy.study.progress import ProgressCallback
from samstudy.study.pruning import CheckpointPruner
from samstudy.study.result import EXIT_CODES, StudyResult
from samstudy.study.searchspace import param_space
from samstudy.study.spec import StudySpec
from samstudy.study.state import (
    ExperimentFiles,
    Growth,
    RunnerError,
    done_count,
    experiment_path,
    grow,
    is_uri,
    load_state,
    new_state,
    outcome,
    reconcile,
    resolve_storage_path,
    save_state,
    segments,
    spool_path,
    study_fingerprint,
)
from samstudy.study.tracking import StudyTracker
from samstudy.study.tuneconfig import (
    quiet_tune,
    trial_dirname,
    tune_config,
    tune_env,
    tune_switches,
    tune_trainable,
)
from samstudy.study.worker import absolute_paths

logger = logging.getLogger(__name__)

# Experiments started before the study package was split (up to commit 4cb92f8) pickled their
# run config's callbacks as `samstudy.study.runner._Dispatch` / `_DropEarlierEpochs`, and
# `Tuner.restore` unpickles them by that path: these names must stay importable here.
_Dispatch = _callbacks._Dispatch
_DropEarlierEpochs = _callbacks._DropEarlierEpochs
_trial_dirname = trial_dirname

__all__ = [
    "EXIT_CODES",
    "RunnerError",
    "StudyResult",
    "check_storage",
    "init_ray",
    "run_study",
]


# -- the study ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Where one of the study's Tune experiments lives (see ``state.segments``)."""

    files: ExperimentFiles  # for the pruner and the replay of its results
    tune_storage: str  # Tune's storage_path and experiment name for a new run, and its path
    name: str
    tune_path: str


def _segment(files: ExperimentFiles, tune_storage: str, tune_path: str, name: str) -> _Segment:
    """The first segment (``name`` empty) is the study's experiment; a growth's is a subfolder
    of it named ``name`` (``grow-1``)."""
    if not name:
        return _Segment(files, tune_storage, tune_path.rstrip("/").rpartition("/")[2], tune_path)
    sub = ExperimentFiles(f"{files.path}/{name}", files.endpoint)
    return _Segment(sub, tune_path, name, f"{tune_path}/{name}")


def _tune_state_readable(files: ExperimentFiles) -> bool:
    """Whether the newest of Tune's ``experiment_state-*.json`` files in ``files`` parses."""
    import json

    names = sorted(
        n for n in files.names() if n.startswith("experiment_state-") and n.endswith(".json")
    )
    if not names:
        return False
    try:
        json.loads(files.read_text(names[-1]) or "")
    except ValueError:
        return False
    return True


def _done(state: Mapping[str, Any], trial_id: str) -> bool:
    return state["trials"].get(trial_id, {}).get("status") in tags.DONE_STATUSES


def run_study(
    study: StudySpec,
    *,
    fresh: bool = False,
    address: str | None = None,
    storage_path: str | None = None,
    shared_storage: bool | None = None,
    tracking_uri: str | None = None,
    max_failures: int = 3,
    num_cpus: int | None = None,
    reuse_actors: bool = True,
    progress: bool = True,
    progress_interval_s: float = 10.0,
    callbacks: Sequence[Any] = (),
    flush_timeout_s: float = 120.0,
    root: Path | None = None,
    out: TextIO | None = None,
    preflight: bool = True,
) -> StudyResult:
    """Run (or resume) ``study`` with Ray Tune, tracking it in MLflow; see the module docstring.

    ``callbacks`` are extra ``ray.tune.Callback`` objects (tests use them to inject faults).
    ``preflight``: the checks of :mod:`~samstudy.study.preflight` first (``PreflightError``).
    ``reuse_actors`` keeps each worker process for the next trial: a new process pays the
    torch/torchvision imports again (seconds), which dominates short trials.
    Raises :class:`RunnerError` for a study that cannot run as asked.
    """
    # With num_to_keep, Tune snapshots its state whenever a trial checkpointed that often (so
    # no deleted checkpoint is referenced); that is intended, its warning about it is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    out = out or sys.stdout
    root = root or project_root()
    started = time.monotonic()
    expanded = study.expand() if study.search is None else []
    trials = [dataclasses.replace(t, config=absolute_paths(t.config, root)) for t in expanded]
    uri, experiment = tracking_target(study.name, tracking_uri, None, study.tracking, root)
    storage = resolve_storage_path(storage_path or study.storage_path, root)
    path = experiment_path(storage, study.name)
    if preflight:  # an S3 bucket that does not answer: refused before anything reads it
        raise_if(study.path, [p for p in [storage_problem(storage, study.storage_endpoint)] if p])
    files = ExperimentFiles(path, study.storage_endpoint)
    # A URI goes to Tune with its filesystem (which knows the endpoint) and paths on it.
    tune_fs = files.fs if is_uri(path) else None
    tune_storage, tune_path = (
        (files.base.rpartition("/")[0], files.base) if tune_fs else (storage, path)
    )
    fingerprint = study_fingerprint(study, trials)
    spool = spool_path(path, study.name, root)

    state = None if fresh else load_state(files, study, expanded, fingerprint)
    if state is not None and state.get("config_ids"):  # started by a version up to f069e68
        ids = [config_trial_id(t.config) for t in expanded]
        trials = [dataclasses.replace(t, trial_id=i) for t, i in zip(trials, ids, strict=True)]
    tracker = StudyTracker(
        uri,
        study.name,
        experiment=experiment,
        study_sha256=study.sha256,
        description=study.description,
        overrides=study.overrides,
        total=len(trials) if study.search is None else study.search.num_samples,
        spool_path=spool,
        spool_max_mb=study.tracking.spool_max_mb,
        root=root,
    )
    result = StudyResult(study.name, "", path, uri)
    growth = Growth([], [])
    if state is not None and study.search is None:  # trials added to or taken from the file
        growth = grow(state, study, [t.trial_id for t in trials], fingerprint)
    if growth.removed:
        print(
            f"{len(growth.removed)} trials are no longer in the study file: their MLflow runs "
            f"and Ray results are left as they are (trial ids {', '.join(growth.removed)})",
            file=out,
        )
    if state is not None and state.get("complete"):
        if spool.is_file():  # send what an earlier run had to spool
            tracker.start(announce=False)
            result.tracking_pending = tracker.finish(None, flush_timeout_s)
        result.status = "already_complete"
        result.trials = {k: v["status"] for k, v in state["trials"].items()}
        print(
            f"study {study.name} is complete ({len(result.trials)} trials in "
            f"{path}); nothing to run. Results: MLflow {redact(uri)}, experiment "
            f"{experiment!r}. Use --fresh to run it again from scratch.",
            file=out,
        )
        return result

    owns_ray = init_ray(address, num_cpus)
    try:
        check_storage(storage, shared_storage)
        if preflight:  # before anything is deleted or started
            cluster = address or os.environ.get("RAY_ADDRESS") or None
            problems = static_problems(study)
            problems += environment_problems(
                study, uri, experiment, cluster, ray_up=True, check_storage=False
            )[0]
            raise_if(study.path, problems)
        if fresh:  # only now: a refused set-up must not have deleted anything
            files.delete()
            spool.unlink(missing_ok=True)
        tracker.start(purge=fresh)
        status = "interrupted"
        outcomes: OutcomeCallback | None = None
        control: DriverControl | None = None
        fault: StorageFault | None = None
        try:
            # The study's Tune experiments: the first in `path`, each growth's in a subfolder.
            parts = [{"name": "", "trial_ids": None}]
            if state is not None and study.search is None:
                parts = segments(state)
            where = {p["name"]: _segment(files, tune_storage, tune_path, p["name"]) for p in parts}
            restoring = any(
                tune.Tuner.can_restore(w.tune_path, storage_filesystem=tune_fs)
                for w in where.values()
            )
            if state is None or not restoring:  # nothing to resume: a new outcome record
                state = new_state(study, fingerprint)
                state["max_failures"] = max_failures
                state["own_loggers"] = True  # run_config_callbacks(): the JSON logger only
                if study.search is None:
                    grow(state, study, [t.trial_id for t in trials], fingerprint)
                    parts = segments(state)
                where = {"": _segment(files, tune_storage, tune_path, "")}
            save_state(files, state)
            resolver = TrialResolver(study, root, bool(state.get("config_ids")))
            # Tune restores the retries an experiment started with; so does the book.
            scheme = path.split("://", 1)[0] if is_uri(path) else ""
            book = FailureBook(int(state.get("max_failures", max_failures)), scheme)
            tracking = TrackingCallback(tracker, resolver, book)
            if restoring:
                replayed = sum(reconcile(w.files, tracking, state) for w in where.values())
                logger.info("reconciled %d Tune results with MLflow", replayed)
            total = len(trials) if study.search is None else study.search.num_samples
            done = done_count(state, [t.trial_id for t in trials] if study.search is None else None)
            outcomes = OutcomeCallback(files, state, resolver, book)
            active: list[Any] = [book, tracking, outcomes]  # the book first: it decides retries
            if progress:
                active.append(
                    ProgressCallback(total, resolver, done, out, progress_interval_s, book=book)
                )
            control = DriverControl(files)  # `samstudy stop` from any shell
            active += [control, *callbacks]
            if growth.new:
                verb = f"growing study {study.name}: {len(growth.new)} new trials, {total} in all"
            else:
                verb = (
                    f"{'resuming' if restoring else 'starting'} study {study.name}: {total} trials"
                )
            print(
                f"{verb} ({done} done) in {path}; MLflow {redact(uri)}, experiment {experiment!r}",
                file=out,
                flush=True,
            )
            fn = tune_trainable(study, root, (files.path, files.endpoint))
            keep_final = study.checkpoints.keep_final
            try:
                for part in parts:  # one Tune experiment after the other
                    if control.stopping:
                        break
                    ids = part["trial_ids"]
                    todo = [t for t in trials if ids is None or t.trial_id in ids]
                    pending = [t for t in todo if not _done(state, t.trial_id)]
                    if study.search is None and not pending:
                        continue
                    at = where.get(part["name"]) or _segment(
                        files, tune_storage, tune_path, part["name"]
                    )
                    again = tune.Tuner.can_restore(at.tune_path, storage_filesystem=tune_fs)
                    if again and not _tune_state_readable(at.files):
                        # Cut short when the storage filled up: Tune would restore no trials.
                        print(
                            f"Tune's saved state in {at.files.path} is damaged (written while "
                            "the storage was full?): its unfinished trials start again from "
                            "their first epoch; their MLflow runs keep the epochs logged",
                            file=out,
                            flush=True,
                        )
                        again = False
                        todo = pending if study.search is None else todo
                    pruner = CheckpointPruner(at.files, finished=not keep_final)
                    if again and (swept := pruner.sweep()):
                        print(
                            f"removed {swept} checkpoint(s) that the stopped driver left and "
                            "no trial needs",
                            file=out,
                            flush=True,
                        )
                    # Experiments of this version hold their JSON logger in the run config, so
                    # a restore too runs without Tune's default loggers (older ones keep them).
                    switches = tune_switches(again and not state.get("own_loggers"))
                    with dispatching([*active, pruner]), tune_env(switches), quiet_tune():
                        if again:
                            tuner = tune.Tuner.restore(
                                at.tune_path,
                                fn,
                                resume_unfinished=True,
                                resume_errored=True,
                                storage_filesystem=tune_fs,
                            )
                        else:
                            tuner = tune.Tuner(
                                fn,
                                param_space=param_space(study, todo),
                                tune_config=tune_config(study, reuse_actors),
                                run_config=tune.RunConfig(
                                    name=at.name,
                                    storage_path=at.tune_storage,
                                    storage_filesystem=tune_fs,
                                    failure_config=tune.FailureConfig(max_failures=max_failures),
                                    checkpoint_config=tune.CheckpointConfig(
                                        num_to_keep=study.checkpoints.keep
                                    ),
                                    callbacks=run_config_callbacks(),
                                    verbose=0,
                                ),
                            )
                        with pruner.deferring():
                            tuner.fit()
                    pruner.prune(final=True)  # Tune's final state is saved: the rest is safe now
            except Exception as exc:
                # A trial's checkpoint or the state file (the book saw it; Tune wraps what a
                # callback raises), or Tune's own writes to the storage.
                fault = book.fault
                if fault is None and isinstance(exc, OSError) and is_storage_error(exc):
                    fault = StorageFault(f"{type(exc).__name__}: {exc}")
                if fault is None and not control.stopping:
                    raise
            if fault is None:
                status = outcome(study, [t.trial_id for t in trials], state)
        finally:
            # Whatever happened, the outcome is recorded and tracking is flushed or spooled.
            if state is not None:
                if outcomes is not None:
                    for trial in outcomes.interrupt():  # runs left resumable, not RUNNING
                        tracker.set_status(trial, tags.INTERRUPTED)
                    result.failures = {resolver.of(t)["name"]: f for t, f in outcomes.failed_now()}
                state["complete"] = status == "complete"
                try:
                    save_state(files, state)
                except OSError as exc:
                    if not is_storage_error(exc):
                        raise
                    fault = fault or StorageFault(f"{type(exc).__name__}: {exc}")
                result.trials = {k: v["status"] for k, v in state["trials"].items()}
            result.status = "storage_fault" if fault is not None else status
            if control is not None:
                result.stopped = control.stopping
                control.close()
            if tracker.pending:
                print(f"flushing {tracker.pending} MLflow operations...", file=out, flush=True)
            result.tracking_pending = tracker.finish(status, flush_timeout_s)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    result.wall_s = time.monotonic() - started
    if fault is not None:
        result.message = (
            f"the study's storage {storage} cannot be written ({fault}); free space there "
            f"or move it (--storage-path), then run `samstudy study {study.name}` again to "
            "resume"
        )
    return result
