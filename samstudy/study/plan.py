"""``plan``: the expanded trial table, the trial count and a rough cost estimate.

The estimate is arithmetic on a throughput table, not a measurement of your hardware: expect it
to be right within a factor of about two. It exists to tell a 10-minute study from a 10-GPU-day
one before anything is launched.

Cost model of one trial (all terms in seconds)::

    steps/epoch  = ceil(n_train / batch_size), capped by max_steps_per_epoch
    pass time    = batch_size / throughput + overhead      (one forward+backward)
    step time    = pass time * passes                       (1 for sgd, 2 for two-step optimizers,
                                                           + 0.5 for logit-SAM's extra pass,
                                                           + a fixed cost per m-sharpness
                                                           micro-batch)
    epoch time   = steps * step time + n_test / (3 * throughput)          (evaluation)
    sharpness    = (power_iters + hutchinson_samples) * 2 * batch / throughput, every k epochs
    trial time   = startup + epochs * epoch time + sharpness

``THROUGHPUT`` gives training samples per second of one plain SGD step (forward + backward):
the ``cpu`` column on one CPU thread (measured on this project's shared 2-core development
machine in fp32: small models at batch 64, CIFAR models at batch 8-16, ResNet-34/50 and WRN-28-10
scaled from ResNet-18 by their FLOPs), the ``gpu`` column on one A100/H100-class GPU in bf16 with
device-resident data (estimates from public CIFAR training-speed reports, not measured here).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samstudy.study.spec import StudySpec, TrialSpec

# (model, data family) -> (cpu samples/s on one thread, gpu samples/s); family: digits, cifar,
# gaussian. Keys with family None are the fallback for any data set.
THROUGHPUT: dict[tuple[str, str | None], tuple[float, float]] = {
    ("mlp", "digits"): (15000.0, 400000.0),
    ("cnn", "digits"): (4000.0, 200000.0),
    ("linear", None): (60000.0, 2000000.0),
    ("linear2", None): (45000.0, 2000000.0),
    ("mlp", None): (5000.0, 200000.0),
    ("cnn", None): (500.0, 60000.0),
    ("resnet18", None): (10.0, 7000.0),
    ("resnet34", None): (5.0, 3800.0),
    ("resnet50", None): (3.5, 2300.0),
    ("wrn16_8", None): (10.0, 3000.0),
    ("wrn28_10", None): (1.2, 1100.0),
    ("wrn40_2", None): (40.0, 6500.0),
}
DEFAULT_THROUGHPUT = (10.0, 3000.0)

# Fixed cost per forward+backward pass (kernel launches, Python): what small models pay.
PASS_OVERHEAD_S = {"cpu": 0.0, "gpu": 0.002}
# Fixed cost of each extra micro-batch of m-sharpness (its own ascent, perturb, restore): measured
# for 1-SAM on the linear model here (1.1 ms); a guess on a GPU.
MICRO_PASS_OVERHEAD_S = {"cpu": 0.0011, "gpu": 0.003}
# Process start, imports, data loading and model set-up of one trial.
STARTUP_S = {"cpu": 3.0, "gpu": 20.0}
# Multi-threaded CPU trials do not scale perfectly.
THREAD_EFFICIENCY = 0.7

_DATA_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000)}
_DIGITS_TOTAL = 1797


def data_sizes(config: Mapping[str, Any]) -> tuple[int, int]:
    """(n_train, n_test) of a trial config's data set."""
    data = config.get("data", {})
    name = data.get("name", "digits")
    if name == "digits":
        # sklearn's train_test_split rounds the test share up.
        n_test = math.ceil(_DIGITS_TOTAL * float(data.get("test_size", 0.2)))
        n_train = _DIGITS_TOTAL - n_test
    elif name == "gaussian":
        synthetic = data.get("synthetic", {})
        n_train, n_test = int(synthetic.get("n_train", 512)), int(synthetic.get("n_test", 2048))
    else:
        n_train, n_test = _DATA_SIZES.get(name, (50000, 10000))
    # data.train_fraction trains on a share of the training set; the test set stays whole.
    return max(1, round(n_train * float(data.get("train_fraction", 1.0)))), n_test


def _family(data_name: str) -> str:
    return "cifar" if data_name.startswith("cifar") else data_name


def throughput(model: str, data_name: str, device: str) -> float:
    """Training samples/s of one SGD step for ``model`` on ``data_name`` (``cpu``: one thread)."""
    row = THROUGHPUT.get((model, _family(data_name))) or THROUGHPUT.get((model, None))
    cpu, gpu = row or DEFAULT_THROUGHPUT
    return gpu if device == "gpu" else cpu


def trial_seconds(config: Mapping[str, Any], device: str, threads: int = 1) -> float:
    """Estimated wall time of one trial (see the module docstring for the model)."""
    n_train, n_test = data_sizes(config)
    rate = throughput(config["model"]["name"], config["data"]["name"], device)
    if device == "cpu" and threads > 1:
        rate *= 1 + (threads - 1) * THREAD_EFFICIENCY
    overhead = PASS_OVERHEAD_S[device]
    batch = int(config.get("batch_size", 64))
    steps = math.ceil(n_train / batch)
    if config.get("max_steps_per_epoch"):
        steps = min(steps, int(config["max_steps_per_epoch"]))
    opt = config.get("optimizer", {})
    pass_s = batch / rate + overhead
    step_s = pass_s
    if opt.get("name", "sam") != "sgd":
        second = pass_s * (1.5 if opt.get("second_grad", "full") == "logit" else 1.0)
        m = opt.get("m")
        if m and m < batch:
            second += (math.ceil(batch / m) - 1) * MICRO_PASS_OVERHEAD_S[device]
        step_s += second
    epoch_s = steps * step_s + n_test / (3 * rate)
    epochs = int(config.get("epochs", 1))
    sharp = config.get("sharpness", {})
    sharp_s = 0.0
    if sharp.get("every"):
        hvps = int(sharp.get("power_iters", 20)) + int(sharp.get("hutchinson_samples", 10))
        sharp_batch = int(sharp.get("batch_size", 256))
        per_measure = hvps * (2 * sharp_batch / rate + 2 * overhead)
        sharp_s = (epochs // int(sharp["every"])) * per_measure
    return STARTUP_S[device] + epochs * epoch_s + sharp_s


@dataclass(frozen=True)
class CostEstimate:
    """A study's estimated cost; ``trial_hours`` is the sum of trial times."""

    device: str  # "cpu" or "gpu"
    trials: int
    trial_hours: float
    concurrency: int | None  # trials at once on this machine (cpu), None for gpu
    wall_hours: float | None  # at that concurrency (cpu only)

    def summary(self) -> str:
        """One line for people: CPU minutes and wall time, or GPU-hours."""
        if self.device == "gpu":
            return (
                f"estimated cost: ~{self.trial_hours:.1f} GPU-hours for {self.trials} trials "
                "(sum of trial times on one A100/H100-class GPU; trials sharing a GPU each run "
                "slower, so the total stays about the same)"
            )
        wall = f"; ~{self.wall_hours * 60:.1f} min wall at {self.concurrency} trials at once "
        return (
            f"estimated cost: ~{self.trial_hours * 60:.1f} CPU-minutes for {self.trials} trials"
            + (wall + f"on this machine ({os.cpu_count()} CPUs)" if self.wall_hours else "")
        )


def wall_hours(spec: StudySpec, cpus: float | None = None, gpus: float | None = None) -> str:
    """The study's wall time on ``cpus`` CPUs or ``gpus`` GPUs (``plan --cpus/--gpus``)."""
    device = "gpu" if spec.resources.gpus > 0 else "cpu"
    trials = spec.expand()
    threads = max(1, int(spec.resources.cpus))
    seconds = [
        trial_seconds(t.config, device, threads=t.config.get("threads") or threads) for t in trials
    ]
    if spec.search is not None:
        seconds = seconds * spec.search.num_samples
    if gpus is not None:
        per, unit = spec.resources.gpus, "GPU"
        amount = gpus
        if per == 0:
            return f"--gpus {gpus:g}: the trials use no GPU (resources.gpus: 0); see --cpus"
    else:
        per, unit, amount = spec.resources.cpus, "CPU", float(cpus or 1)
    slots = max(1, int(amount / per + 1e-9))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    slots = min(slots, len(seconds))
    hours = max(sum(seconds) / 3600 / slots, max(seconds) / 3600)
    from samstudy.study.status import duration

    return (
        f"on {amount:g} {unit}s: {slots} trials at once ({per:g} {unit} each), about "
        f"{duration(hours * 3600)} wall, from the estimate above"
    )


def _local_concurrency(spec: StudySpec) -> int:
    slots = max(1, int((os.cpu_count() or 1) // max(spec.resources.cpus, 1e-9)))
    return min(slots, spec.max_concurrent) if spec.max_concurrent else slots


def study_trial_seconds(spec: StudySpec, trials: Sequence[TrialSpec]) -> list[float]:
    """:func:`trial_seconds` of each of ``trials`` on the study's device (a GPU when its trials
    ask for one) and with its threads (a trial's own ``threads``, else its CPUs)."""
    device = "gpu" if spec.resources.gpus > 0 else "cpu"
    threads = max(1, int(spec.resources.cpus))
    return [
        trial_seconds(t.config, device, threads=t.config.get("threads") or threads) for t in trials
    ]


def estimate_cost(spec: StudySpec) -> CostEstimate:
    """Estimated cost of a study: all trials of a grid, or ``num_samples`` base-like trials.

    A search is priced as ``num_samples`` full trials of the base config (ASHA usually stops
    most of them early, so that is an upper bound).
    """
    device = "gpu" if spec.resources.gpus > 0 else "cpu"
    trials = spec.expand()
    seconds = study_trial_seconds(spec, trials)
    count = len(trials)
    if spec.search is not None:
        count = spec.search.num_samples
        seconds = seconds * count
    total_h = sum(seconds) / 3600
    if device == "gpu":
        return CostEstimate("gpu", count, total_h, None, None)
    conc = _local_concurrency(spec)
    # Trials run in waves: the wall time is at least the longest trial.
    wall_h = max(total_h / min(conc, count), max(seconds) / 3600)
    return CostEstimate("cpu", count, total_h, conc, wall_h)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_cell(v) for v in value) + "]"
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return [line.rstrip() for line in lines]


def trial_table(trials: list[TrialSpec]) -> list[str]:
    """Lines of a table: index, trial id, run name, one column per varied path."""
    columns: list[str] = []
    for t in trials:
        for key in t.overrides:
            if key not in columns:
                columns.append(key)
    # The seed is crossed with everything: last column, next to the name's -sN.
    columns.sort(key=lambda c: c == "seed")
    rows = [
        [str(i), t.trial_id, t.name, *(_cell(t.overrides.get(c)) for c in columns)]
        for i, t in enumerate(trials, 1)
    ]
    return _table(rows, ["#", "trial_id", "name", *columns])


def format_plan(spec: StudySpec) -> str:
    """What ``make plan NAME=...`` prints: header, trial table (or search space), count, cost."""
    trials = spec.expand()
    res = spec.resources
    lines = [f"study {spec.name}  ({spec.path}, sha256 {spec.sha256[:12]})"]
    if spec.description:
        lines += textwrap.wrap(
            " ".join(spec.description.split()), 98, initial_indent="  ", subsequent_indent="  "
        )
    gpu = f", {res.gpus:g} GPU" if res.gpus else ""
    conc = spec.max_concurrent or "as resources allow"
    lines += [f"resources per trial: {res.cpus:g} CPU{gpu}; max concurrent trials: {conc}", ""]
    cost = estimate_cost(spec)
    if spec.search is not None:
        s = spec.search
        lines.append(
            f"search: {s.algorithm} over {len(s.params)} parameter(s), {s.num_samples} samples, "
            f"{s.mode}imise {s.metric} (seed {s.seed})"
        )
        for path, p in s.params.items():
            if p.type == "categorical":
                lines.append(f"  {path}: one of {_cell(p.values)}")
            else:
                log = ", log scale" if p.log else ""
                lines.append(f"  {path}: {p.type} in [{_cell(p.low)}, {_cell(p.high)}]{log}")
        if s.asha is not None:
            a = s.asha
            lines.append(
                f"  ASHA: max_t {a.max_t or spec.base.epochs} epochs, grace period "
                f"{a.grace_period}, reduction factor {a.reduction_factor:g} (cost below: no "
                "early stopping, an upper bound)"
            )
        lines += ["", "base trial:", *trial_table(trials), ""]
        lines.append(f"{s.num_samples} trials (search samples)")
    else:
        lines += trial_table(trials)
        lines.append("")
        configs = len(trials) // max(1, len(spec.seed_list or [None]))
        seeds = spec.seed_list
        detail = f" ({configs} configurations x {len(seeds)} seeds)" if seeds else ""
        lines.append(f"{len(trials)} trials{detail}")
    lines.append(cost.summary())
    from samstudy.study.smoke import load_smoke, measured_cost_line

    smoke, why = load_smoke(spec)
    lines.append(measured_cost_line(smoke) if smoke is not None and smoke.ok else why)
    from samstudy.study.disk import estimate_disk

    # On this machine, the trials that fit at once; elsewhere max_concurrent or every trial.
    running = cost.concurrency or spec.max_concurrent or cost.trials
    storage = spec.storage_path or "results/ray"
    lines.append(estimate_disk(spec, running).summary(f"{storage}/{spec.name}"))
    return "\n".join(lines)
