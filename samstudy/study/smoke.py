"""``samstudy smoke NAME``: every distinct trial type of a study, a few steps each, where the
study will run; the measured step times, memory and first errors, and the cost they imply.

A **trial type** is a distinct combination of model, data set, optimizer variant (its label
without rho: rho does not change the cost), batch size and precision; its first trial (lowest
seed) stands for it. Each type runs as one Ray task with the study's per-trial resources, in a
fresh worker process (so its peak memory is its own), on this machine or the cluster at
``RAY_ADDRESS``: two epochs of ``steps`` training steps each (the first warms up, the second
is timed) and one evaluation on the whole test set per epoch. Nothing is written to the study's
MLflow experiment or Ray storage; the measurements go to ``results/smoke/NAME.json``
(``$SAMSTUDY_SMOKE_DIR``), where ``plan`` finds them and prints the measured cost beside its
estimate. The set-up time is a fresh process's (imports, data, model); the cost counts it
once per slot, as Tune reuses a worker for the next trial.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samstudy.optim.config import optimizer_label
from samstudy.paths import redact, results_root
from samstudy.study.plan import data_sizes
from samstudy.study.spec import StudySpec, TrialSpec

DEFAULT_STEPS = 5


@dataclass
class TypeResult:
    """One trial type's measurement (or its first error)."""

    key: str  # model / data / optimizer / batch / precision, readable
    trial: str  # the run name of the trial that stood for the type
    trials: int  # how many of the study's trials are of this type
    step_s: float | None = None  # one training step (forward, backward(s), update)
    samples_per_s: float | None = None
    eval_s: float | None = None  # per epoch: evaluation and the epoch's own measurements
    setup_s: float | None = None  # worker start to the first step: imports, data, model
    peak_bytes: int | None = None
    memory: str = ""  # "cuda peak allocated" or "resident set size"
    device: str = ""
    node: str = ""
    error: str | None = None


@dataclass
class SmokeResult:
    """What ``smoke`` measured for a study, and the cost that follows."""

    study: str
    sha256: str
    overrides: list[str]
    when: str
    steps: int
    types: list[TypeResult] = field(default_factory=list)
    trial_hours: float | None = None
    wall_hours: float | None = None
    slots: int | None = None

    @property
    def ok(self) -> bool:
        return all(t.error is None for t in self.types)


def type_key(config: Mapping[str, Any]) -> str:
    """The trial type of a config: what decides a step's cost."""
    model = config.get("model", {})
    kwargs = model.get("kwargs") or {}
    data = config.get("data", {})
    fraction = data.get("train_fraction", 1.0)
    parts = [
        str(model.get("name")) + (json.dumps(kwargs, sort_keys=True) if kwargs else ""),
        str(data.get("name")) + (f"x{fraction:g}" if fraction not in (None, 1, 1.0) else ""),
        optimizer_label(config.get("optimizer", {})),
        f"batch {config.get('batch_size')}",
        str(config.get("precision", "auto")),
    ]
    return " / ".join(parts)


def trial_types(study: StudySpec) -> dict[str, list[TrialSpec]]:
    """The study's trials by type (a search: its base trial and its points to evaluate)."""
    if study.search is None:
        trials = study.expand()
    else:
        trials = [
            *study.expand(),
            *map(study.trial_from_overrides, study.search.points_to_evaluate),
        ]
    groups: dict[str, list[TrialSpec]] = {}
    for trial in trials:
        groups.setdefault(type_key(trial.config), []).append(trial)
    return groups


def smoke_trial(config: dict[str, Any], steps: int) -> dict[str, Any]:
    """Run ``config`` for two epochs of ``steps`` steps in this process; the measurements."""
    started = time.perf_counter()
    import resource

    import torch

    from samstudy.data import resolve_device
    from samstudy.train import run_trial

    config = {**config, "epochs": 2, "max_steps_per_epoch": steps, "checkpoint_every": 0}
    epochs: list[tuple[float, dict[str, Any]]] = []
    device = resolve_device(config.get("device", "auto"))
    out: dict[str, Any] = {"device": str(device)}
    try:
        run_trial(config, lambda metrics, _ckpt: epochs.append((time.perf_counter(), metrics)))
    except Exception as exc:  # the first error is the result
        first = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        return {**out, "error": redact(first)[:500]}
    (end1, first_epoch), (_end2, second) = epochs[0], epochs[-1]
    batch = int(config.get("batch_size", 128))
    samples_per_s = float(second["samples_per_sec"])
    step_s = batch / samples_per_s
    train_s = min(steps, math.ceil(data_sizes(config)[0] / batch)) * step_s
    out.update(
        step_s=step_s,
        samples_per_s=samples_per_s,
        eval_s=max(0.0, float(second["epoch_time"]) - train_s),
        setup_s=max(0.0, end1 - float(first_epoch["epoch_time"]) - started),
    )
    if device.type == "cuda":
        out.update(peak_bytes=int(torch.cuda.max_memory_allocated(device)), memory="cuda peak")
    else:  # Linux reports kilobytes
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_bytes=int(rss), memory="peak RSS")
    return out


def trial_seconds(config: Mapping[str, Any], measured: TypeResult) -> float:
    """A trial's training time from its type's measurement: per epoch every step of the
    training set (or ``max_steps_per_epoch``) and the evaluation (set-up apart)."""
    assert measured.step_s is not None and measured.eval_s is not None
    batch = int(config.get("batch_size", 128))
    steps = math.ceil(data_sizes(config)[0] / batch)
    if config.get("max_steps_per_epoch"):
        steps = min(steps, int(config["max_steps_per_epoch"]))
    epoch_s = steps * measured.step_s + measured.eval_s
    return int(config.get("epochs", 1)) * epoch_s


def study_slots(study: StudySpec, resources: Mapping[str, float]) -> int:
    """Trials at once: the cluster's (or this machine's) CPUs and GPUs over each trial's
    share, capped by ``max_concurrent``."""
    res = study.resources
    slots = int(resources.get("CPU", os.cpu_count() or 1) / max(res.cpus, 1e-9) + 1e-9)
    if res.gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) / res.gpus + 1e-9))
    if study.max_concurrent:
        slots = min(slots, study.max_concurrent)
    return max(1, slots)


def run_smoke(
    study: StudySpec,
    *,
    steps: int = DEFAULT_STEPS,
    address: str | None = None,
    num_cpus: int | None = None,
    root: Path | None = None,
) -> SmokeResult:
    """Measure every trial type of ``study`` on Ray (see the module docstring)."""
    import ray

    from samstudy.paths import project_root
    from samstudy.study.cluster import init_ray
    from samstudy.study.worker import absolute_paths

    root = root or project_root()
    groups = trial_types(study)
    result = SmokeResult(
        study.name,
        study.sha256,
        study.overrides,
        dt.datetime.now().isoformat(timespec="seconds"),
        steps,
    )
    owns_ray = init_ray(address, num_cpus)
    try:
        task = ray.remote(max_calls=1)(_remote_smoke).options(
            num_cpus=study.resources.cpus, num_gpus=study.resources.gpus
        )
        refs = {
            key: task.remote(absolute_paths(trials[0].config, root), steps)
            for key, trials in groups.items()
        }
        for key, ref in refs.items():
            trials = groups[key]
            measured = TypeResult(key, trials[0].name, len(trials), **ray.get(ref))
            result.types.append(measured)
        resources = ray.cluster_resources()
    finally:
        if owns_ray:
            ray.shutdown()
    if result.ok:
        cost = _cost(study, groups, result.types)
        result.slots = study_slots(study, resources)
        per_trial = cost if study.search is None else cost[:1] * study.search.num_samples
        # A fresh process's set-up (imports, CUDA context) is paid once per slot: Tune reuses
        # a worker for the next trial, which builds only its data and model again.
        setup = max(t.setup_s or 0.0 for t in result.types)
        slots = min(result.slots, len(per_trial))
        result.trial_hours = (sum(per_trial) + slots * setup) / 3600
        result.wall_hours = (max(sum(per_trial) / slots, max(per_trial)) + setup) / 3600
    return result


def _remote_smoke(config: dict[str, Any], steps: int) -> dict[str, Any]:
    import ray

    out = smoke_trial(config, steps)
    out["node"] = ray.get_runtime_context().get_node_id()[:12]
    return out


def _cost(
    study: StudySpec, groups: Mapping[str, Sequence[TrialSpec]], types: Sequence[TypeResult]
) -> list[float]:
    by_key = {t.key: t for t in types}
    return [trial_seconds(t.config, by_key[key]) for key, ts in groups.items() for t in ts]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def format_smoke(result: SmokeResult) -> str:
    """The per-type table and the measured cost, for people."""
    lines = [f"smoke of study {result.study}: {len(result.types)} trial types, {result.steps} "
             "timed steps each (after as many to warm up) and one evaluation"]  # fmt: skip
    for t in result.types:
        lines.append(f"  {t.key}  ({t.trials} trial{'s' if t.trials != 1 else ''}, as {t.trial})")
        if t.error is not None:
            lines.append(f"    FAILED on {t.device or '?'} {t.node}: {t.error}")
            continue
        assert t.step_s is not None and t.samples_per_s is not None
        lines.append(
            f"    {t.step_s * 1000:.1f} ms/step, {t.samples_per_s:,.0f} samples/s, eval "
            f"{t.eval_s or 0:.2f} s/epoch, set-up {t.setup_s or 0:.1f} s, {t.memory} "
            f"{_mib(t.peak_bytes)} on {t.device} (node {t.node})"
        )
    if result.trial_hours is None or result.wall_hours is None:
        failed = sum(t.error is not None for t in result.types)
        lines.append(f"{failed} of {len(result.types)} trial types failed: no cost measured")
    else:
        lines.append(measured_cost_line(result))
    return "\n".join(lines)


def measured_cost_line(result: SmokeResult) -> str:
    """``measured cost: ...`` (what ``plan`` prints beside its estimate)."""
    from samstudy.study.status import duration

    assert result.trial_hours is not None and result.wall_hours is not None
    return (
        f"measured cost (smoke {result.when}): {duration(result.trial_hours * 3600)} of trial "
        f"time ({result.trial_hours:.2f} trial-hours); about {duration(result.wall_hours * 3600)}"
        f" wall at {result.slots} trials at once"
    )


def smoke_path(name: str) -> Path:
    """Where the smoke result of study ``name`` is kept: ``$SAMSTUDY_SMOKE_DIR/NAME.json``,
    default ``results/smoke/NAME.json``."""
    folder = os.environ.get("SAMSTUDY_SMOKE_DIR") or results_root() / "smoke"
    return Path(folder) / f"{name}.json"


def save_smoke(result: SmokeResult, path: Path | None = None) -> Path:
    """Write ``result`` as JSON (``smoke_path``)."""
    path = path or smoke_path(result.study)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=1))
    return path


def load_smoke(study: StudySpec, path: Path | None = None) -> tuple[SmokeResult | None, str]:
    """The saved smoke result of ``study`` and a note; (None, why) when there is none that
    matches this study file and ``--set``."""
    path = path or smoke_path(study.name)
    if not path.is_file():
        return None, f"no smoke result yet (`make smoke NAME={study.name}` measures the cost)"
    data = json.loads(path.read_text())
    types = [TypeResult(**t) for t in data.pop("types", [])]
    result = SmokeResult(**data, types=types)
    if result.sha256 != study.sha256 or result.overrides != study.overrides:
        return None, (
            f"the smoke result in {path} is of another version of the study file or --set: "
            f"run `make smoke NAME={study.name}` again"
        )
    if not result.ok:
        return None, f"the last smoke run ({path}) had failures: see `make smoke NAME={study.name}`"
    return result, ""
