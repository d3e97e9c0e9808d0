"""Run a study with Ray Tune: one Tune trial per expanded trial, tracked in MLflow from the driver.

``run_study(spec)`` is what ``samstudy study NAME`` calls:

* grid studies become a ``tune.grid_search`` over the expanded trials (each a plain dict: id,
  run name, full config, overrides); search studies sample ``overrides`` with Optuna (TPE or
  random) through ``OptunaSearch``, optionally with ASHA early stopping;
* the trainable runs ``samstudy.train.run_trial`` with a ``report`` adapter that saves the
  checkpoint dict with ``torch.save`` and hands it to ``ray.tune.report``; a retried or restored
  trial continues from ``ray.tune.get_checkpoint()`` (loaded with ``weights_only=True``);
* ``FailureConfig(max_failures)`` retries a failed trial from its last checkpoint;
* the Ray experiment lives in ``<storage_path>/<study name>`` (default
  ``<project>/results/ray/NAME``). Running a study again resumes it (``Tuner.restore``,
  unfinished and errored trials continued); a complete study starts nothing; ``fresh=True``
  deletes the Ray experiment and soft-deletes the study's MLflow runs first;
* callbacks on the driver: MLflow tracking (``tracking.StudyTracker``), the per-trial outcome
  file that decides completeness, and a compact live progress view.

Tune pickles ``RunConfig.callbacks`` into the experiment and brings the pickled ones back on
``Tuner.restore``. So the run config holds a single stateless dispatcher that forwards every
hook to the callbacks of the *current* ``run_study`` call (``_ACTIVE``), never stale copies.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from samstudy.paths import absolute_path, project_root
from samstudy.study.spec import StudySpec, TrialSpec
from samstudy.study.tracking import (
    NODE_TAG,
    TERMINAL_STATUSES,
    WALL_TIME,
    StudyTracker,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "trial.pt"
STATE_FILE = "samstudy_state.json"
SPOOL_FILE = "samstudy_mlflow_spool.json"
SHARED_STORAGE_ENV = "SAMSTUDY_SHARED_STORAGE"
# Worker-side clocks in every Tune result (see `trainable`); `_` keeps them out of MLflow.
TRIAL_CLOCK = "_trial_wall_s"
REPORT_CLOCK = "_in_report_s"
TRIAL_START = "_trial_start_time"  # time.time() when the trainable started
# A worker collects epochs for up to this many seconds before one `tune.report` (see `trainable`).
REPORT_BATCH_S = 1.0
EARLIER_EPOCHS = "_earlier_epochs"  # the collected epochs before a result's own
# Outcomes that count as done: a rerun does not start these trials again.
DONE_STATUSES = ("completed", "diverged", "stopped")


class RunnerError(RuntimeError):
    """A study that cannot be run as asked (the message says why and what to do)."""


@dataclass
class StudyResult:
    """What ``run_study`` did.

    ``status``: ``complete`` (every trial ended completed / diverged / stopped), ``failed``
    (every trial ended, some failed after all retries), ``interrupted`` (stopped before the end),
    or ``already_complete`` (nothing was started).
    """

    name: str
    status: str
    experiment_path: str
    tracking_uri: str
    trials: dict[str, str] = field(default_factory=dict)  # trial id -> status
    wall_s: float = 0.0
    tracking_pending: int = 0  # tracking operations spooled because MLflow was unreachable

    @property
    def ok(self) -> bool:
        """True when the study is complete (now or before)."""
        return self.status in ("complete", "already_complete")


# -- paths -----------------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``: storage that every node reaches by itself."""
    return "://" in path


def resolve_storage_path(path: str | None, root: Path | None = None) -> str:
    """Absolute storage path (Tune requires it): relative paths are taken from the project."""
    if path is None:
        return str((root or project_root()) / "results" / "ray")
    if is_uri(path):
        return path.rstrip("/")
    return str(absolute_path(path, root))


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


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if is_uri(base) else str(Path(base) / name)


class _ExperimentFiles:
    """Small text files in the experiment directory, local or on a URI (pyarrow filesystems)."""

    def __init__(self, path: str) -> None:
        import pyarrow.fs

        self.path = path
        self.fs, self.base = pyarrow.fs.FileSystem.from_uri(path)

    def _info(self, rel: str = "") -> Any:
        return self.fs.get_file_info(f"{self.base}/{rel}".rstrip("/"))

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs

        return self._info(rel).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.base}/{rel}") as stream:
            return stream.read().decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.fs.create_dir(self.base, recursive=True)
        tmp = f"{self.base}/.{rel}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(text.encode("utf-8"))
        self.fs.move(tmp, f"{self.base}/{rel}")  # atomic on a local disk

    def delete(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.base)

    def subdirs(self) -> list[str]:
        import pyarrow.fs

        if not self.exists():
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.base, recursive=False))
        return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]


# -- the trainable (runs in a Ray worker) ------------------------------------------------------


def trainable(
    config: dict[str, Any],
    study: StudySpec | None = None,
    root: str | None = None,
    batch_s: float = REPORT_BATCH_S,
    checkpoint_min_s: float = 0.0,
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
    dropped, except on the last epoch (the study's ``checkpoint_min_s``).

    Every result carries worker-side clocks (left out of MLflow by their ``_`` prefix):
    ``TRIAL_CLOCK`` (seconds since this call started, imports included), ``REPORT_CLOCK``
    (seconds spent inside earlier ``tune.report`` calls: persisting checkpoints and waiting for
    Tune's driver) and ``TRIAL_START`` (the wall-clock start). The difference of the first two at
    the last result is the trial's own time.
    """
    started_at, started = time.time(), time.perf_counter()
    import ray
    import torch
    from ray import tune

    from samstudy.train import run_trial

    # Tune logs every persisted checkpoint at INFO; one line per epoch per trial drowns the view.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    trial = resolve_trial(config, study, root=Path(root) if root else None)
    node_id = ray.get_runtime_context().get_node_id()  # which node ran it, for the MLflow tags
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
        metrics.update({"node_id": node_id, REPORT_CLOCK: in_report, TRIAL_START: started_at})
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

    batcher = EpochBatcher(send, batch_s, checkpoint_min_s)
    try:
        run_trial(trial["config"], batcher, resume=resume)
    except Exception:
        batcher.flush()  # the epochs before the error reach MLflow even if no retry is left
        raise


class EpochBatcher:
    """The trainer's ``report(metrics, checkpoint)`` that holds short epochs back.

    An epoch is held while less than ``batch_s`` seconds passed since the last send; it goes out
    later with the next result sent, under ``EARLIER_EPOCHS``. A result is sent at once when it
    carries a checkpoint (nothing before a checkpoint can be lost), is the last one (status
    other than ``running``), or ``batch_s`` has passed. A checkpoint that comes less than
    ``checkpoint_min_s`` after the last one sent (or after the start) is dropped, unless it is
    the last epoch's. Every epoch gets ``WALL_TIME``.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any], dict[str, Any] | None], None],
        batch_s: float,
        checkpoint_min_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.send = send
        self.batch_s = batch_s
        self.checkpoint_min_s = checkpoint_min_s
        self.clock = clock
        self.held: list[dict[str, Any]] = []
        self.last_sent = self.last_checkpoint = clock()

    def __call__(self, metrics: Mapping[str, Any], state: dict[str, Any] | None = None) -> None:
        metrics = {WALL_TIME: time.time(), **metrics}
        final = metrics.get("status") != "running"
        now = self.clock()
        if state is not None and not final and now - self.last_checkpoint < self.checkpoint_min_s:
            state = None
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

    def _send(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        metrics[EARLIER_EPOCHS] = self.held
        self.held = []
        self.send(metrics, state)
        self.last_sent = self.clock()


def epoch_results(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-epoch results in one Tune result: the epochs batched before it, then itself."""
    return [*result.get(EARLIER_EPOCHS, ()), result]


def resolve_trial(
    config: Mapping[str, Any],
    study: StudySpec | None,
    tune_trial_id: str | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """The samstudy trial (plain dict) behind a Tune trial's config.

    A search study's sampled points may repeat, so its trial ids get the Tune trial id appended:
    every sample keeps its own MLflow run.
    """
    if "trial" in config:  # from_dict: a trial of an older version gets its variant
        return TrialSpec.from_dict(dict(config["trial"])).to_dict()
    if study is None:
        raise RunnerError("a search trial needs its study spec")
    overrides = decode_overrides(study, dict(config["overrides"]))
    trial = study.trial_from_overrides(overrides).to_dict()
    trial["config"] = absolute_paths(trial["config"], root or project_root())
    if tune_trial_id:
        trial["trial_id"] = f"{trial['trial_id']}-{tune_trial_id}"
    return trial


def _trial_dirname(trial: Any) -> str:
    # Module-level (Tune pickles it); short, filesystem-safe and recognisable.
    inner = trial.config.get("trial")
    label = f"{inner['trial_id']}_{inner['name']}" if inner else trial.trial_id
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)[:100]


# -- search spaces ---------------------------------------------------------------------------


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def search_space(study: StudySpec) -> dict[str, Any]:
    """Tune domains for a search study's params (Optuna only takes plain categorical values,
    so lists, e.g. a whole ``optimizer.scales``, travel as JSON strings)."""
    from ray import tune

    assert study.search is not None
    space: dict[str, Any] = {}
    for path, param in study.search.params.items():
        if param.type == "categorical":
            values = list(param.values or [])
            if all(_is_plain(v) for v in values):
                space[path] = tune.choice(values)
            else:
                space[path] = tune.choice([json.dumps(v) for v in values])
        elif param.type == "int":
            low, high = int(param.low), int(param.high) + 1  # type: ignore[arg-type]
            space[path] = tune.lograndint(low, high) if param.log else tune.randint(low, high)
        else:
            low_f, high_f = float(param.low), float(param.high)  # type: ignore[arg-type]
            space[path] = (
                tune.loguniform(low_f, high_f) if param.log else tune.uniform(low_f, high_f)
            )
    return {"overrides": space}


def decode_overrides(study: StudySpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`search_space`'s JSON encoding of non-plain categorical values."""
    assert study.search is not None
    out = dict(overrides)
    for path, param in study.search.params.items():
        values = param.values or []
        if param.type == "categorical" and not all(_is_plain(v) for v in values):
            if isinstance(out.get(path), str):
                out[path] = json.loads(out[path])
    return out


def study_fingerprint(study: StudySpec, trials: Sequence[TrialSpec]) -> str:
    """What must not change for a study to be resumed: its trial ids (grid) or its search."""
    import hashlib

    if study.search is None:
        payload: Any = sorted(t.trial_id for t in trials)
    else:
        payload = {
            "base": study.base.model_dump(mode="json"),
            "search": study.search.model_dump(mode="json"),
        }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- driver-side callbacks -------------------------------------------------------------------

_ACTIVE: list[Any] = []  # the callbacks of the run_study call in progress


class _Dispatch(Callback):
    """Stateless, picklable forwarder to ``_ACTIVE`` (see the module docstring)."""

    def setup(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.setup(**info)

    def on_step_end(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_step_end(**info)

    def on_trial_start(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_start(**info)

    def on_trial_restore(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_restore(**info)

    def on_trial_result(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_result(**info)

    def on_trial_complete(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_complete(**info)

    def on_trial_recover(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_recover(**info)

    def on_trial_error(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_trial_error(**info)

    def on_experiment_end(self, **info: Any) -> None:
        for cb in list(_ACTIVE):
            cb.on_experiment_end(**info)


class _DropEarlierEpochs(Callback):
    """Last in the run config: the batched epochs leave the result once the loggers have it.

    Tune keeps each trial's last result and writes it into every snapshot of its experiment
    state (one per ``num_to_keep`` checkpoints of a trial, on the driver). With up to a second of
    epochs batched in it, that JSON was most of the driver's snapshot time; ``result.json`` (the
    JSON logger, before this) keeps every epoch for :func:`reconcile`.
    """

    def on_trial_result(self, result: dict, **info: Any) -> None:
        result.pop(EARLIER_EPOCHS, None)  # Tune lets callbacks edit the result in place


class TrialResolver:
    """Tune trial -> samstudy trial dict, cached per Tune trial id."""

    def __init__(self, study: StudySpec, root: Path | None = None) -> None:
        self.study = study
        self.root = root
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, config: Mapping[str, Any], tune_trial_id: str) -> dict[str, Any]:
        if tune_trial_id not in self._cache:
            search = "trial" not in config
            self._cache[tune_trial_id] = resolve_trial(
                config, self.study, tune_trial_id if search else None, self.root
            )
        return self._cache[tune_trial_id]

    def of(self, trial: Any) -> dict[str, Any]:
        """The samstudy trial of a Tune ``Trial``."""
        return self(trial.config, trial.trial_id)


def final_status(last_result: Mapping[str, Any] | None) -> str:
    """A trial's outcome from its last report: ``completed`` / ``diverged`` as the trainer said,
    ``stopped`` when a scheduler ended it while it was still running."""
    status = (last_result or {}).get("status")
    return status if status in ("completed", "diverged") else "stopped"


class TrackingCallback(Callback):
    """Feeds a :class:`StudyTracker` from Tune's driver-side events."""

    def __init__(self, tracker: StudyTracker, resolver: TrialResolver) -> None:
        self.tracker = tracker
        self.resolver = resolver
        self._nodes: dict[str, str] = {}

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self.tracker.trial_started(self.resolver.of(trial))

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        samstudy_trial = self.resolver.of(trial)
        node = result.get("node_id")
        if node and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            tags = {
                NODE_TAG: str(node),
                "samstudy.node_ip": str(result.get("node_ip", "")),
                "samstudy.hostname": str(result.get("hostname", "")),
            }
            self.tracker.set_tags(samstudy_trial, tags)
        for epoch_result in epoch_results(result):
            self.tracker.log_result(samstudy_trial, epoch_result)

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(
            self.resolver.of(trial), "running", tags={"samstudy.retried": "true"}
        )

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self.tracker.set_status(self.resolver.of(trial), "failed")


class OutcomeCallback(Callback):
    """Records every trial's outcome in the experiment's state file as it happens.

    The file, not Tune's in-memory trial states (an interrupted run reports never-started trials
    as TERMINATED), decides whether a study is complete.
    """

    def __init__(
        self, files: _ExperimentFiles, state: dict[str, Any], resolver: TrialResolver
    ) -> None:
        self.files = files
        self.state = state
        self.resolver = resolver

    def _record(self, trial: Any, status: str) -> None:
        samstudy_trial = self.resolver.of(trial)
        epoch = (trial.last_result or {}).get("epoch")
        self.state["trials"][samstudy_trial["trial_id"]] = {
            "name": samstudy_trial["name"],
            "status": status,
            "epoch": epoch,
            "tune_trial_id": trial.trial_id,
        }
        self.files.write_text(STATE_FILE, json.dumps(self.state, indent=1))

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self._record(trial, "running")

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._record(trial, final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self._record(trial, "failed")


class ProgressCallback(Callback):
    """A compact live view: one line per trial event, epoch lines throttled per trial, and a
    summary line every ``summary_s`` seconds."""

    KEYS = ("train_loss", "train_acc", "test_acc", "best_test_acc", "memorization")

    def __init__(
        self,
        total: int,
        resolver: TrialResolver,
        done: int = 0,
        out: TextIO | None = None,
        interval_s: float = 10.0,
        summary_s: float = 30.0,
    ) -> None:
        self.total = total
        self.resolver = resolver
        self.done = done
        self.out = out or sys.stdout
        self.interval_s = interval_s
        self.summary_s = summary_s
        self.start = time.monotonic()
        self._last_line: dict[str, float] = {}
        self._last_summary = self.start
        self._running: set[str] = set()
        self._started: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {text}", file=self.out, flush=True)

    def _label(self, trial: Any) -> str:
        inner = self.resolver.of(trial)
        return f"{inner['trial_id'][:12]} {inner['name']}"

    def on_trial_start(self, trial: Any, **info: Any) -> None:
        self._running.add(trial.trial_id)
        self._started[trial.trial_id] = time.monotonic()
        self._print(f"{'start':<10}{self._label(trial)}  ({len(self._running)} running)")

    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_line.get(trial.trial_id, -math.inf) < self.interval_s:
            return
        self._last_line[trial.trial_id] = now
        epochs = self.resolver.of(trial)["config"].get("epochs", "?")
        values = " ".join(
            f"{k} {result[k]:.4g}" for k in self.KEYS if isinstance(result.get(k), int | float)
        )
        self._print(f"epoch {result.get('epoch', '?')}/{epochs}  {self._label(trial)}  {values}")

    def _finished(self, trial: Any, status: str) -> None:
        self._running.discard(trial.trial_id)
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        took = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        last = trial.last_result or {}
        best = last.get("best_test_acc")
        extra = f" best_test_acc {best:.4g}" if isinstance(best, int | float) else ""
        self._print(
            f"{status:<10}{self._label(trial)}  epoch {last.get('epoch', '?')}{extra} "
            f"({took:.1f} s)  [{self.done}/{self.total} done]"
        )

    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self._finished(trial, final_status(trial.last_result))

    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self._finished(trial, "FAILED")

    def on_trial_recover(self, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._print(
            f"{'retry':<10}{self._label(trial)}  (failed after epoch {epoch}; from checkpoint)"
        )

    def on_step_end(self, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_summary >= self.summary_s:
            self._last_summary = now
            counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
            self._print(
                f"{'summary':<10}{self.done}/{self.total} done ({counts or 'none yet'}), "
                f"{len(self._running)} running"
            )


# -- ray ---------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS`` or start a local Ray; True if this call started
    (or connected) it, so the caller shuts it down. An already initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        # Through Ray Client, Tune runs the experiment (and so the MLflow tracking callbacks)
        # in a remote actor; the driver-side tracking needs a real driver on the cluster.
        raise RunnerError(
            f"RAY_ADDRESS {address!r} is a Ray Client address; run `samstudy study` on a node "
            "of the cluster with RAY_ADDRESS=HEAD_IP:6379 (the GCS address) instead"
        )
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # No dashboard: nothing listens beyond what Ray itself needs (bound to this host).
        ray.init(include_dashboard=False, num_cpus=num_cpus, logging_level=logging.WARNING)
    return True


def check_storage(storage: str, shared: bool | None = None) -> None:
    """Refuse a node-local storage path on a cluster of several nodes.

    Trials on other nodes write their checkpoints to ``storage``; a restored trial must find
    them wherever it is placed, so the path has to be shared (a URI, or a network filesystem
    mounted at the same path on every node, declared with ``--shared-storage`` or
    ``SAMSTUDY_SHARED_STORAGE=1``).
    """
    import ray

    if shared is None:
        shared = os.environ.get(SHARED_STORAGE_ENV, "").lower() in ("1", "true", "yes")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not is_uri(storage) and not shared:
        raise RunnerError(
            f"the Ray cluster has {len(nodes)} nodes but the storage path {storage} is a local "
            "folder: checkpoints written on one node would be missing when a trial resumes on "
            "another. Use shared storage: a URI (s3://bucket/path, gs://...) or a network "
            "filesystem mounted at the same path on every node, then pass --storage-path PATH "
            f"and --shared-storage (or set {SHARED_STORAGE_ENV}=1)."
        )


# -- reconcile MLflow with Tune's own results ------------------------------------------------


def reconcile(
    files: _ExperimentFiles,
    resolver: TrialResolver,
    tracker: StudyTracker,
    state: Mapping[str, Any] | None,
) -> int:
    """Queue every epoch in Tune's ``result.json`` files (and recorded outcomes) for MLflow.

    Logged epochs are skipped by the tracker, so this only fills gaps: results buffered in a
    driver that was killed, or an MLflow store that lost them. Returns the epochs read.
    """
    count = 0
    seen: dict[str, dict[str, Any]] = {}
    for sub in files.subdirs():
        text = files.read_text(f"{sub}/result.json")
        if not text:
            continue
        for line in text.splitlines():
            try:
                result = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if "config" not in result or "trial_id" not in result:
                continue
            trial = resolver(result["config"], result["trial_id"])
            seen[trial["trial_id"]] = trial
            for epoch_result in epoch_results(result):
                tracker.log_result(trial, epoch_result)
                count += 1
    recorded = (state or {}).get("trials", {})
    for trial_id, trial in seen.items():
        status = recorded.get(trial_id, {}).get("status")
        if status in TERMINAL_STATUSES:
            tracker.set_status(trial, status)
    return count


# -- the study ---------------------------------------------------------------------------------


def _outcome(study: StudySpec, trial_ids: Sequence[str], state: Mapping[str, Any]) -> str:
    recorded = state.get("trials", {})
    if study.search is None:
        statuses = [recorded.get(t, {}).get("status") for t in trial_ids]
    else:
        statuses = [v.get("status") for v in recorded.values()]
        statuses += [None] * max(0, study.search.num_samples - len(statuses))
    if all(s in DONE_STATUSES for s in statuses):
        return "complete"
    if all(s in TERMINAL_STATUSES for s in statuses):
        return "failed"
    return "interrupted"


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
    from ray.tune.logger import JsonLoggerCallback

    out = out or sys.stdout
    root = root or project_root()
    started = time.monotonic()
    trials = study.expand() if study.search is None else []
    trials = [
        dataclasses.replace(t, config=absolute_paths(t.config, root))
        for t in trials
    ]
    uri = resolve_tracking_uri(tracking_uri, study.tracking.tracking_uri, root)
    storage = resolve_storage_path(storage_path or study.storage_path, root)
    experiment_path = _join(storage, study.name)
    files = _ExperimentFiles(experiment_path)
    fingerprint = study_fingerprint(study, trials)
    spool = (
        Path(experiment_path) / SPOOL_FILE
        if not is_uri(experiment_path)
        else root / "results" / "ray" / f"{study.name}.{SPOOL_FILE}"
    )

    state: dict[str, Any] | None = None
    if not fresh:
        text = files.read_text(STATE_FILE)
        state = json.loads(text) if text else None
    if state is not None and state.get("fingerprint") != fingerprint:
        raise RunnerError(
            f"{study.path}: the study's trials changed since it started in {experiment_path} "
            "(Ray Tune cannot resume a changed search space). Restore the file, or run it "
            "again with --fresh to start over (which deletes the old Ray results and MLflow runs)."
        )
    tracker = StudyTracker(
        uri,
        study.name,
        experiment=study.experiment,
        study_sha256=study.sha256,
        description=study.description,
        spool_path=spool,
        root=root,
    )
    result = StudyResult(study.name, "", experiment_path, uri)
    if state is not None and state.get("complete"):
        if spool.is_file():  # send what an earlier run had to spool
            tracker.start(announce=False)
            result.tracking_pending = tracker.finish(None, flush_timeout_s)
        result.status = "already_complete"
        result.trials = {k: v["status"] for k, v in state["trials"].items()}
        print(
            f"study {study.name} is complete ({len(result.trials)} trials in "
            f"{experiment_path}); nothing to run. Results: MLflow {uri}, experiment "
            f"{study.experiment!r}. Use --fresh to run it again from scratch.",
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
        try:
            state = _prepare_state(files, state, study, fingerprint, tune.Tuner)
            restoring = tune.Tuner.can_restore(experiment_path)
            resolver = TrialResolver(study, root)
            if restoring:
                replayed = reconcile(files, resolver, tracker, state)
                logger.info("reconciled %d Tune results with MLflow", replayed)
            resources = {"cpu": study.resources.cpus, "gpu": study.resources.gpus}
            # ASHA decides at each rung epoch: give it every epoch as it ends
            asha = study.search is not None and study.search.asha is not None
            fn: Callable[..., Any] = tune.with_parameters(
                trainable,
                study=study,
                root=str(root),
                batch_s=0.0 if asha else REPORT_BATCH_S,
                checkpoint_min_s=study.checkpoint_min_s,
            )
            fn = tune.with_resources(fn, resources)
            total = len(trials) if study.search is None else study.search.num_samples
            done = sum(1 for v in state["trials"].values() if v["status"] in DONE_STATUSES)
            active: list[Any] = [TrackingCallback(tracker, resolver)]
            active.append(OutcomeCallback(files, state, resolver))
            if progress:
                active.append(ProgressCallback(total, resolver, done, out, progress_interval_s))
            active.extend(callbacks)
            verb = "resuming" if restoring else "starting"
            print(
                f"{verb} study {study.name}: {total} trials ({done} done) in {experiment_path}; "
                f"MLflow {uri}, experiment {study.experiment!r}",
                file=out,
                flush=True,
            )
            if restoring:
                tuner = tune.Tuner.restore(
                    experiment_path, fn, resume_unfinished=True, resume_errored=True
                )
            else:
                tuner = tune.Tuner(
                    fn,
                    param_space=_param_space(study, trials),
                    tune_config=_tune_config(study, reuse_actors),
                    run_config=tune.RunConfig(
                        name=study.name,
                        storage_path=storage,
                        failure_config=tune.FailureConfig(max_failures=max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                        callbacks=[_Dispatch(), JsonLoggerCallback(), _DropEarlierEpochs()],
                        verbose=0,
                    ),
                )
            _ACTIVE[:] = active
            try:
                with _tune_env(_tune_switches(restoring)):
                    tuner.fit()
            finally:
                _ACTIVE.clear()
            status = _outcome(study, [t.trial_id for t in trials], state)
        finally:
            # Whatever happened, the outcome is recorded and tracking is flushed or spooled.
            if state is not None:
                state["complete"] = status == "complete"
                files.write_text(STATE_FILE, json.dumps(state, indent=1))
                result.trials = {k: v["status"] for k, v in state["trials"].items()}
            result.status = status
            if tracker.pending:
                print(f"flushing {tracker.pending} MLflow operations...", file=out, flush=True)
            result.tracking_pending = tracker.finish(status, flush_timeout_s)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    result.wall_s = time.monotonic() - started
    return result


def _tune_switches(restoring: bool) -> dict[str, str]:
    """Tune's environment switches that cut its per-result driver work for this study.

    No CSV and TensorBoard loggers (driver CPU and an fsync per result, read by nothing here);
    the JSON one, whose ``result.json`` :func:`reconcile` reads, is in the run config. A
    restored experiment brings its own pickled callbacks, so it keeps Tune's defaults. Tune's
    legacy console output, silent at ``verbose=0``: the newer one prints a configuration box
    and a results path into the study's own progress view even then.
    (Tune's own result buffering, ``TUNE_RESULT_BUFFER_LENGTH``, is not used: Ray 2.60's
    controller passes its two arguments to ``train_buffered`` in swapped order; the trainable
    batches its epochs itself, see :func:`trainable`.)
    """
    switches = {"RAY_AIR_NEW_OUTPUT": "0"}
    if not restoring:
        switches["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return switches


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


def _prepare_state(
    files: _ExperimentFiles,
    state: dict[str, Any] | None,
    study: StudySpec,
    fingerprint: str,
    tuner_cls: Any,
) -> dict[str, Any]:
    """The outcome record to continue, or a new one when there is no Tune run to resume."""
    if state is None or not tuner_cls.can_restore(files.path):
        state = {
            "study": study.name,
            "fingerprint": fingerprint,
            "sha256": study.sha256,
            "complete": False,
            "trials": {},
        }
    files.write_text(STATE_FILE, json.dumps(state, indent=1))
    return state


def _param_space(study: StudySpec, trials: Sequence[TrialSpec]) -> dict[str, Any]:
    from ray import tune

    if study.search is None:
        return {"trial": tune.grid_search([t.to_dict() for t in trials])}
    return search_space(study)


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
