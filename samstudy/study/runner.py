"""Run a study with Ray Tune: one Tune trial per expanded trial, tracked in MLflow from the driver.

``run_study(spec)`` is what ``samstudy study NAME`` calls. It wires the study package together:

* ``searchspace``: grid studies become a ``tune.grid_search`` over the expanded trials; search
  studies sample ``overrides`` with Optuna (TPE or random) through ``OptunaSearch``, optionally
  with ASHA early stopping (the Tune config is made here);
* ``worker``: the trainable each Tune trial runs in a Ray worker; ``FailureConfig(max_failures)``
  retries a failed trial from its last checkpoint;
* ``state``: the Ray experiment lives in ``<storage_path>/<study name>`` (default
  ``<project>/results/ray/NAME``). Running a study again resumes it (``Tuner.restore``,
  unfinished and errored trials continued); a complete study starts nothing; ``fresh=True``
  deletes the Ray experiment and soft-deletes the study's MLflow runs first;
* ``callbacks`` on the driver: MLflow tracking (``tracking.StudyTracker``), the per-trial
  outcome file that decides completeness, and a compact live view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from samstudy import tags
from samstudy.paths import project_root
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
from samstudy.study.failures import StorageFault, is_storage_error
from samstudy.study.progress import ProgressCallback
from samstudy.study.pruning import CheckpointPruner
from samstudy.study.result import EXIT_CODES, StudyResult
from samstudy.study.searchspace import param_space
from samstudy.study.spec import StudySpec
from samstudy.study.state import (
    ExperimentFiles,
    RunnerError,
    done_count,
    experiment_path,
    load_state,
    new_state,
    outcome,
    reconcile,
    resolve_storage_path,
    save_state,
    spool_path,
    study_fingerprint,
)
from samstudy.study.tracking import StudyTracker
from samstudy.study.worker import REPORT_BATCH_S, absolute_paths, trainable

logger = logging.getLogger(__name__)

# Experiments started before the study package was split (up to commit 4cb92f8) pickled their
# run config's callbacks as `samstudy.study.runner._Dispatch` / `_DropEarlierEpochs`, and
# `Tuner.restore` unpickles them by that path: these names must stay importable here.
_Dispatch = _callbacks._Dispatch
_DropEarlierEpochs = _callbacks._DropEarlierEpochs

__all__ = [
    "EXIT_CODES",
    "RunnerError",
    "StudyResult",
    "check_storage",
    "init_ray",
    "run_study",
]


# -- the study ---------------------------------------------------------------------------------


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
) -> StudyResult:
    """Run (or resume) ``study`` with Ray Tune, tracking it in MLflow; see the module docstring.

    ``callbacks`` are extra ``ray.tune.Callback`` objects (tests use them to inject faults).
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
    trials = study.expand() if study.search is None else []
    trials = [dataclasses.replace(t, config=absolute_paths(t.config, root)) for t in trials]
    uri, experiment = tracking_target(study.name, tracking_uri, None, study.tracking, root)
    storage = resolve_storage_path(storage_path or study.storage_path, root)
    path = experiment_path(storage, study.name)
    files = ExperimentFiles(path)
    fingerprint = study_fingerprint(study, trials)
    spool = spool_path(path, study.name, root)

    state = None if fresh else load_state(files, study, trials, fingerprint)
    tracker = StudyTracker(
        uri,
        study.name,
        experiment=experiment,
        study_sha256=study.sha256,
        description=study.description,
        overrides=study.overrides,
        spool_path=spool,
        root=root,
    )
    result = StudyResult(study.name, "", path, uri)
    if state is not None and state.get("complete"):
        if spool.is_file():  # send what an earlier run had to spool
            tracker.start(announce=False)
            result.tracking_pending = tracker.finish(None, flush_timeout_s)
        result.status = "already_complete"
        result.trials = {k: v["status"] for k, v in state["trials"].items()}
        print(
            f"study {study.name} is complete ({len(result.trials)} trials in "
            f"{path}); nothing to run. Results: MLflow {uri}, experiment "
            f"{experiment!r}. Use --fresh to run it again from scratch.",
            file=out,
        )
        return result

    owns_ray = init_ray(address, num_cpus)
    try:
        check_storage(storage, shared_storage)
        if fresh:  # only now: a refused set-up must not have deleted anything
            files.delete()
            spool.unlink(missing_ok=True)
        tracker.start(purge=fresh)
        status = "interrupted"
        outcomes: OutcomeCallback | None = None
        fault: StorageFault | None = None
        try:
            restoring = tune.Tuner.can_restore(path)
            if state is None or not restoring:  # nothing to resume: a new outcome record
                state = new_state(study, fingerprint)
                state["max_failures"] = max_failures
                state["own_loggers"] = True  # run_config_callbacks(): the JSON logger only
            save_state(files, state)
            resolver = TrialResolver(study, root)
            # Tune restores the retries an experiment started with; so does the book.
            book = FailureBook(int(state.get("max_failures", max_failures)))
            tracking = TrackingCallback(tracker, resolver, book)
            if restoring:
                replayed = reconcile(files, tracking, state)
                logger.info("reconciled %d Tune results with MLflow", replayed)
            total = len(trials) if study.search is None else study.search.num_samples
            done = done_count(state)
            outcomes = OutcomeCallback(files, state, resolver, book)
            active: list[Any] = [book, tracking, outcomes]  # the book first: it decides retries
            pruner = None if study.checkpoints.keep_final else CheckpointPruner(files)
            if pruner is not None:
                active.append(pruner)
            if progress:
                active.append(
                    ProgressCallback(total, resolver, done, out, progress_interval_s, book=book)
                )
            active.extend(callbacks)
            verb = "resuming" if restoring else "starting"
            print(
                f"{verb} study {study.name}: {total} trials ({done} done) in {path}; "
                f"MLflow {uri}, experiment {experiment!r}",
                file=out,
                flush=True,
            )
            fn = _trainable(study, root)
            # Experiments of this version hold their JSON logger in the run config, so a
            # restore too runs without Tune's default loggers (older ones keep them).
            switches = _tune_switches(restoring and not state.get("own_loggers"))
            try:
                with dispatching(active), _tune_env(switches), _quiet_tune():
                    if restoring:
                        tuner = tune.Tuner.restore(
                            path, fn, resume_unfinished=True, resume_errored=True
                        )
                    else:
                        tuner = tune.Tuner(
                            fn,
                            param_space=param_space(study, trials),
                            tune_config=_tune_config(study, reuse_actors),
                            run_config=tune.RunConfig(
                                name=study.name,
                                storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=max_failures),
                                checkpoint_config=tune.CheckpointConfig(
                                    num_to_keep=study.checkpoints.keep
                                ),
                                callbacks=run_config_callbacks(),
                                verbose=0,
                            ),
                        )
                    tuner.fit()
                if pruner is not None:  # Tune's final state is saved: the rest is safe now
                    pruner.prune()
            except Exception as exc:
                # A trial's checkpoint or the state file (the book saw it; Tune wraps what a
                # callback raises), or Tune's own writes to the storage.
                fault = book.fault
                if fault is None and isinstance(exc, OSError) and is_storage_error(exc):
                    fault = StorageFault(f"{type(exc).__name__}: {exc}")
                if fault is None:
                    raise
            if fault is None:
                status = outcome(study, [t.trial_id for t in trials], state)
        finally:
            # Whatever happened, the outcome is recorded and tracking is flushed or spooled.
            if state is not None:
                if outcomes is not None:
                    for trial in outcomes.interrupt():  # runs left resumable, not RUNNING
                        tracker.set_status(trial, tags.INTERRUPTED)
                    result.failures = {
                        resolver.of(t)["name"]: f for t, f in outcomes.failed_now()
                    }
                state["complete"] = status == "complete"
                try:
                    save_state(files, state)
                except OSError as exc:
                    if not is_storage_error(exc):
                        raise
                    fault = fault or StorageFault(f"{type(exc).__name__}: {exc}")
                result.trials = {k: v["status"] for k, v in state["trials"].items()}
            result.status = "storage_fault" if fault is not None else status
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


# -- the Tune config ---------------------------------------------------------------------------


def _trainable(study: StudySpec, root: Path) -> Callable[..., Any]:
    """The worker's trainable with the study's parameters and per-trial resources."""
    from ray import tune

    # ASHA decides at each rung epoch: give it every epoch as it ends
    asha = study.search is not None and study.search.asha is not None
    fn = tune.with_parameters(
        trainable,
        study=study,
        root=str(root),
        batch_s=0.0 if asha else REPORT_BATCH_S,
        checkpoint_min_s=study.checkpoint_min_s,
    )
    return tune.with_resources(fn, {"cpu": study.resources.cpus, "gpu": study.resources.gpus})


def _trial_dirname(trial: Any) -> str:
    # Module-level: Tune pickles it into the experiment (TuneConfig.trial_dirname_creator) and
    # unpickles it by this path on restore, so it stays here. Short, filesystem-safe and
    # recognisable.
    inner = trial.config.get("trial")
    label = f"{inner['trial_id']}_{inner['name']}" if inner else trial.trial_id
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)[:100]


def _tune_switches(restoring: bool) -> dict[str, str]:
    """Tune's environment switches that cut its per-result driver work for this study.

    No CSV and TensorBoard loggers (driver CPU and an fsync per result, read by nothing here);
    the JSON one, whose ``result.json`` :func:`~samstudy.study.state.reconcile` reads, is in
    the run config (``restoring`` an experiment of an earlier version, whose run config has no
    JSON logger, keeps Tune's defaults). Tune's legacy console output, silent at ``verbose=0``: the newer one prints a
    configuration box and a results path into the study's own progress view even then.
    (Tune's own result buffering, ``TUNE_RESULT_BUFFER_LENGTH``, is not used: Ray 2.60's
    controller passes its two arguments to ``train_buffered`` in swapped order; the trainable
    batches its epochs itself, see :func:`~samstudy.study.worker.trainable`.)
    """
    # Tune logs every trial error with Ray's whole traceback (tens of lines per attempt); the
    # failure callbacks print one line each instead, the traceback stays in error.txt.
    switches = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}
    if not restoring:
        switches["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return switches


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Keep Tune's own end-of-run lines off the console: "Trials did not complete" (the study
    prints its failed trials with their reasons) and, on restore, "Failed to fetch metrics" for
    each trial that had not reported yet."""
    names = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _tune_env(switches: Mapping[str, str]) -> Iterator[None]:
    """Set ``switches`` in the environment for one ``fit`` (values the user set win)."""
    added = [key for key in switches if key not in os.environ]
    for key in added:
        os.environ[key] = switches[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _tune_config(study: StudySpec, reuse_actors: bool) -> Any:
    from ray import tune

    if study.search is None:
        return tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=study.max_concurrent,
            reuse_actors=reuse_actors,
            trial_dirname_creator=_trial_dirname,
        )
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = study.search
    sampler = (
        optuna.samplers.TPESampler(seed=search.seed)
        if search.algorithm == "tpe"
        else optuna.samplers.RandomSampler(seed=search.seed)
    )
    searcher: Any = OptunaSearch(sampler=sampler)
    if study.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent)
    scheduler = None
    if search.asha is not None:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=search.asha.max_t or study.base.epochs,
            grace_period=search.asha.grace_period,
            reduction_factor=search.asha.reduction_factor,
        )
    return tune.TuneConfig(
        metric=search.metric,
        mode=search.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=search.num_samples,
        reuse_actors=reuse_actors,
        trial_dirname_creator=_trial_dirname,
    )
