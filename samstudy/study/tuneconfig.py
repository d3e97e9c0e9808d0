"""The Tune side of a study: its trainable with resources, its TuneConfig (grid or Optuna search,
optionally ASHA), the trial folder names, and the environment switches and log levels that keep
Tune's per-result work and console output down."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from samstudy.study.searchspace import initial_points
from samstudy.study.spec import StudySpec
from samstudy.study.worker import REPORT_BATCH_S, trainable


def tune_trainable(
    study: StudySpec, root: Path, control: tuple[str, str | None] | None = None
) -> Callable[..., Any]:
    """The worker's trainable with the study's parameters and per-trial resources;
    ``control``: the experiment folder and endpoint where a stop request appears."""
    from ray import tune

    # ASHA decides at each rung epoch: give it every epoch as it ends
    asha = study.search is not None and study.search.asha is not None
    fn = tune.with_parameters(
        trainable,
        study=study,
        root=str(root),
        batch_s=0.0 if asha else REPORT_BATCH_S,
        checkpoint_min_s=study.checkpoint_min_s,
        control=control,
        keep_final=study.checkpoints.keep_final,
    )
    return tune.with_resources(fn, {"cpu": study.resources.cpus, "gpu": study.resources.gpus})


def trial_dirname(trial: Any) -> str:
    # Module-level: Tune pickles it into the experiment (TuneConfig.trial_dirname_creator) and
    # unpickles it by this path on restore, so it stays here (experiments of earlier versions
    # name it samstudy.study.runner._trial_dirname, an alias there). Short, filesystem-safe and
    # recognisable.
    inner = trial.config.get("trial")
    label = f"{inner['trial_id']}_{inner['name']}" if inner else trial.trial_id
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)[:100]


def tune_switches(restoring: bool) -> dict[str, str]:
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
def quiet_tune() -> Iterator[None]:
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
def tune_env(switches: Mapping[str, str]) -> Iterator[None]:
    """Set ``switches`` in the environment for one ``fit`` (values the user set win)."""
    added = [key for key in switches if key not in os.environ]
    for key in added:
        os.environ[key] = switches[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def tune_config(study: StudySpec, reuse_actors: bool) -> Any:
    from ray import tune

    if study.search is None:
        return tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=study.max_concurrent,
            reuse_actors=reuse_actors,
            trial_dirname_creator=trial_dirname,
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
    points = initial_points(study) or None  # e.g. the reference trial the report compares with
    searcher: Any = OptunaSearch(sampler=sampler, points_to_evaluate=points)
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
        trial_dirname_creator=trial_dirname,
    )
