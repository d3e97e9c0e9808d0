"""What runs inside a Ray worker: the Tune trainable and the helpers it shares with the driver.

The trainable runs ``samstudy.train.run_trial`` with a ``report`` adapter (:class:`EpochBatcher`)
that saves the checkpoint dict with ``torch.save`` and hands it to ``ray.tune.report``; a
retried or restored trial continues from ``ray.tune.get_checkpoint()`` (loaded with
``weights_only=True``). The result keys defined here (the worker's clocks, the batched epochs,
the wall time of an epoch) are read on the driver by ``samstudy.study.callbacks``.

A worker imports this module before its first trial, so it stays light: torch, Ray and the
trainer are imported inside :func:`trainable` (within the trial's own clock), never MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from samstudy.identity import PLACEMENT_PATHS, config_trial_id
from samstudy.paths import absolute_path, project_root
from samstudy.study.failures import ERROR, Failure, describe
from samstudy.study.searchspace import decode_overrides
from samstudy.study.spec import StudySpec, TrialSpec

CHECKPOINT_FILE = "trial.pt"
# Worker-side clocks in every Tune result (see `trainable`); `_` keeps them out of MLflow.
TRIAL_CLOCK = "_trial_wall_s"
REPORT_CLOCK = "_in_report_s"
TRIAL_START = "_trial_start_time"  # time.time() when the trainable started
# An epoch's wall-clock time (seconds) when the worker produced it: the MLflow timestamp of its
# metrics (epochs reach the driver in batches).
WALL_TIME = "_wall_time"
# A worker collects epochs for up to this many seconds before one `tune.report` (see `trainable`).
REPORT_BATCH_S = 1.0
EARLIER_EPOCHS = "_earlier_epochs"  # the collected epochs before a result's own


def trainable(
    config: dict[str, Any],
    study: StudySpec | None = None,
    root: str | None = None,
    batch_s: float = REPORT_BATCH_S,
    checkpoint_min_s: float = 0.0,
    control: tuple[str, str | None] | None = None,
    keep_final: bool = True,
) -> None:
    """Ray Tune function trainable: one samstudy trial.

    ``config`` is ``{"trial": TrialSpec-as-dict}`` (grid) or ``{"overrides": {...}}`` (search,
    built into a trial with ``study.trial_from_overrides``; ``root`` is the driver's project
    folder, against which relative data paths are resolved).

    Epochs are reported in batches (:class:`EpochBatcher`): ``tune.report`` waits for a round
    trip to Tune's driver (~10 ms), which for epochs of a few milliseconds would be most of a
    short trial's Tune overhead. ``batch_s = 0`` reports every epoch (for schedulers that act on
    each result, such as ASHA). If the trial raises, the held epochs are sent first. A
    checkpoint less than ``checkpoint_min_s`` after the last one kept (or the trial's start) is
    dropped, except on the last epoch (the study's ``checkpoint_min_s``). ``control``: the
    study's experiment folder and storage endpoint, where ``samstudy stop`` leaves its request;
    once it is there, every epoch ends with a checkpoint, sent at once (:class:`StopWatch`).
    ``keep_final`` false (the study's ``checkpoints.keep_final``): the last epoch goes out without
    its checkpoint, which the driver would delete at once (saving one costs a ResNet-18 trial
    about 90 MB written and copied).

    Every result carries worker-side clocks (left out of MLflow by their ``_`` prefix):
    ``TRIAL_CLOCK`` (seconds since this call started, imports included), ``REPORT_CLOCK``
    (seconds spent inside earlier ``tune.report`` calls: persisting checkpoints and waiting for
    Tune's driver) and ``TRIAL_START`` (the wall-clock start). The difference of the first two at
    the last result is the trial's own time.

    The function's name is part of every Tune experiment (``Tuner.restore`` checks it): keep it.
    """
    started_at, started = time.time(), time.perf_counter()
    quiet_requested_exits()
    import ray
    import torch
    from ray import tune

    from samstudy.data import resolve_device
    from samstudy.train import run_trial

    # Tune logs every persisted checkpoint at INFO; one line per epoch per trial drowns the view.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    trial = resolve_trial(config, study, root=Path(root) if root else None)
    # Where it runs, for the MLflow tags: the node, the GPUs Ray gave it (fractional GPUs share
    # ids) and the device the trainer takes ("auto": CUDA if present, else the CPU).
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = str(trial["config"].get("device", "auto"))
    with contextlib.suppress(ValueError):  # CUDA asked for but absent: the trainer says so
        device = str(resolve_device(device))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(
                Path(folder) / CHECKPOINT_FILE, weights_only=True, map_location="cpu"
            )
    in_report = 0.0

    def send(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        nonlocal in_report
        metrics.update({"node_id": node_id, "gpu_ids": gpu_ids, "device": device})
        metrics.update({REPORT_CLOCK: in_report, TRIAL_START: started_at})
        with contextlib.ExitStack() as stack:
            ckpt = None
            if state is not None:
                # Tune copies the folder into the experiment storage inside report(), so a
                # temporary folder is enough.
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="samstudy-ckpt-"))
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                ckpt = tune.Checkpoint.from_directory(folder)
            metrics[TRIAL_CLOCK] = time.perf_counter() - started
            begin = time.perf_counter()
            tune.report(metrics, checkpoint=ckpt)
            in_report += time.perf_counter() - begin

    batcher = EpochBatcher(send, batch_s, checkpoint_min_s, keep_final=keep_final)
    watch = StopWatch(*control) if control is not None else None

    def checkpoint_now() -> bool:  # asked by the trainer after each epoch
        if watch is None or not watch():
            return False
        batcher.keep_checkpoints = True  # sent now, whatever checkpoint_min_s says
        return True

    try:
        run_trial(trial["config"], batcher, resume=resume, checkpoint_now=checkpoint_now)
    except Exception as exc:
        batcher.flush()  # the epochs before the error reach MLflow even if no retry is left
        # The error itself, before Ray wraps it: the driver shows it and decides on retrying.
        metric = study.search.metric if study is not None and study.search is not None else None
        batcher.fail(describe(exc, batcher.last_epoch), metric)
        raise


class EpochBatcher:
    """The trainer's ``report(metrics, checkpoint)`` that holds short epochs back.

    An epoch is held while less than ``batch_s`` seconds passed since the last send; it goes out
    later with the next result sent, under ``EARLIER_EPOCHS``. A result is sent at once when it
    carries a checkpoint (nothing before a checkpoint can be lost), is the last one (status
    other than ``running``), or ``batch_s`` has passed. A checkpoint that comes less than
    ``checkpoint_min_s`` after the last one sent (or after the start) is dropped, unless it is
    the last epoch's; that one is dropped with ``keep_final`` false, unless the study is being
    stopped (the trial resumes from it). Every epoch gets ``WALL_TIME``.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any], dict[str, Any] | None], None],
        batch_s: float,
        checkpoint_min_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
        keep_final: bool = True,
    ) -> None:
        self.send = send
        self.batch_s = batch_s
        self.checkpoint_min_s = checkpoint_min_s
        self.keep_final = keep_final
        self.clock = clock
        self.held: list[dict[str, Any]] = []
        self.last_sent = self.last_checkpoint = clock()
        self.keep_checkpoints = False  # set when the study is being stopped
        self.last: Mapping[str, Any] = {}  # the latest epoch's metrics
        self.last_epoch: int | None = None  # the latest epoch this attempt finished

    def __call__(self, metrics: Mapping[str, Any], state: dict[str, Any] | None = None) -> None:
        metrics = {WALL_TIME: time.time(), **metrics}
        self.last = metrics
        if isinstance(metrics.get("epoch"), int):
            self.last_epoch = metrics["epoch"]
        last = metrics.get("status") != "running"
        final = last or self.keep_checkpoints
        now = self.clock()
        if state is not None and not final and now - self.last_checkpoint < self.checkpoint_min_s:
            state = None
        if last and not self.keep_final and not self.keep_checkpoints:
            state = None  # a finished trial's checkpoint: the driver deletes it on arrival
        if state is None and not final and now - self.last_sent < self.batch_s:
            self.held.append(metrics)
            return
        if state is not None:
            self.last_checkpoint = now
        self._send(metrics, state)

    def flush(self) -> None:
        """Send the held epochs now (the last one as the result)."""
        if self.held:
            self._send(self.held.pop(), None)

    def fail(self, failure: Failure, metric: str | None = None) -> None:
        """Send ``failure`` as one last result (:data:`~samstudy.study.failures.ERROR`), with
        no epoch. A search study's ``metric`` is in it too (its last value, else NaN): Tune
        refuses a result without it. Sending it may fail in turn; the trial's error matters
        more, so that is swallowed."""
        metrics: dict[str, Any] = {ERROR: failure.to_dict()}
        if metric is not None:
            metrics[metric] = self.last.get(metric, float("nan"))
        try:
            self._send(metrics, None)
        except Exception:  # noqa: BLE001 - the driver falls back to Tune's own error record
            pass

    def _send(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        metrics[EARLIER_EPOCHS] = self.held
        self.held = []
        self.send(metrics, state)
        self.last_sent = self.clock()


class StopWatch:
    """Whether ``samstudy stop`` asked the study to stop: its request file in the experiment
    folder, looked at most every ``every_s`` seconds (a stat on a disk, a HEAD on S3); once
    seen, always True."""

    def __init__(self, path: str, endpoint: str | None = None, every_s: float = 2.0) -> None:
        self.path, self.endpoint, self.every_s = path, endpoint, every_s
        self._files: Any = None
        self._next = 0.0
        self.seen = False

    def __call__(self) -> bool:
        if self.seen or time.monotonic() < self._next:
            return self.seen
        self._next = time.monotonic() + self.every_s
        from samstudy.study.control import STOP_FILE
        from samstudy.study.state import ExperimentFiles

        try:
            self._files = self._files or ExperimentFiles(self.path, self.endpoint)
            self.seen = self._files.exists(STOP_FILE)
        except OSError:  # a storage that does not answer: the driver still stops the trial
            pass
        return self.seen


def quiet_requested_exits() -> None:
    """Say nothing when Ray's SIGTERM handler cannot raise its ``SystemExit`` (idempotent).

    Ray ends a worker on SIGTERM (``samstudy stop``, a trial Tune cancels) by raising
    ``SystemExit`` from its signal handler. When the signal lands inside a callback that the
    garbage collector runs (a ``WeakSet``'s), Python cannot raise it there and prints
    "Exception ignored ... Traceback" into the driver's terminal, for an exit that was asked
    for. Every other exception that cannot be raised still goes to the default hook.
    """
    default = sys.unraisablehook
    if getattr(default, "samstudy_quiet_exits", False):
        return

    def hook(args: Any) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, SystemExit):
            return
        default(args)

    hook.samstudy_quiet_exits = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def epoch_results(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-epoch results in one Tune result: the epochs batched before it, then itself."""
    return [*result.get(EARLIER_EPOCHS, ()), result]


def absolute_paths(config: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """A copy of ``config`` with its file paths absolute: Tune runs trials in their own dirs."""
    out = copy.deepcopy(dict(config))
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        data["root"] = str(absolute_path(data["root"], root))
    noise = out.get("noise")
    if isinstance(noise, dict) and isinstance(noise.get("label_file"), str):
        noise["label_file"] = str(absolute_path(noise["label_file"], root))
    return out


def current_placement(trial: Mapping[str, Any], study: StudySpec, root: Path) -> dict[str, Any]:
    """The trial's config with the placement fields (``identity.PLACEMENT_PATHS``: data folder,
    threads, device ...) as the study has them now (its file and ``--set``), so a resumed trial
    runs where the rerun says; a field the trial itself varies keeps its own value."""
    config = copy.deepcopy(dict(trial["config"]))
    base = study.base.model_dump(mode="json")
    varied = trial.get("overrides") or {}
    for path in PLACEMENT_PATHS:
        if any(k == path or k.startswith(path + ".") for k in varied):
            continue
        *parents, leaf = path.split(".")
        source, target = base, config
        for key in parents:
            source, target = source.get(key), target.get(key)
            if not isinstance(source, dict) or not isinstance(target, dict):
                break
        else:
            if leaf in source:
                target[leaf] = source[leaf]
    return absolute_paths(config, root)


def resolve_trial(
    config: Mapping[str, Any],
    study: StudySpec | None,
    tune_trial_id: str | None = None,
    root: Path | None = None,
    config_ids: bool = False,
) -> dict[str, Any]:
    """The samstudy trial (plain dict) behind a Tune trial's config.

    A search study's sampled points may repeat, so its trial ids get the Tune trial id appended:
    every sample keeps its own MLflow run. ``config_ids``: a search started by a version whose
    ids hashed the whole config (``identity.config_trial_id``) keeps them.
    """
    if "trial" in config:  # from_dict: a trial of an older version gets its variant
        trial = TrialSpec.from_dict(dict(config["trial"])).to_dict()
        if study is not None:  # Tune restores the config a trial started with
            trial["config"] = current_placement(trial, study, root or project_root())
        return trial
    if study is None:  # run_study always passes it: a programming error, not a user's
        raise ValueError("a search trial needs its study spec")
    overrides = decode_overrides(study, dict(config["overrides"]))
    trial = study.trial_from_overrides(overrides).to_dict()
    if config_ids:  # a study started by a version up to commit f069e68
        trial["trial_id"] = config_trial_id(trial["config"])
    trial["config"] = absolute_paths(trial["config"], root or project_root())
    if tune_trial_id:
        trial["trial_id"] = f"{trial['trial_id']}-{tune_trial_id}"
    return trial
