"""Trainer overhead: a full training epoch against the bare forward/backward passes.

"Trainer epoch" is what ``run_trial`` does per epoch minus the test pass: the device-resident
loader (shuffle, CIFAR crop/flip), ``optimizer.train_step`` of a samstudy preset, the per-step
lr schedule, the on-device metric sums and the one read per epoch (sums and ``read_stats``).
"Bare" is the minimal loop over the very same batches, already materialised: forward, loss,
backward (twice for SAM) and a ``torch.optim.SGD`` step. Their ratio is the price of everything
the trainer adds, optimizer arithmetic included; it is measured in one process, interleaved, so
machine load affects all sides alike, and each figure is the best of several epochs.

With CUDA available a second section times ResNet-18, batch 128, bf16 autocast, channels_last
epochs of SGD and SAM on CIFAR-shaped data (50,000 random 3x32x32 images on the device), and
records the GPU's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from samstudy.data import DeviceLoader, build_data
from samstudy.models import create_model
from samstudy.optim import create_optimizer
from samstudy.train.config import ScheduleConfig
from samstudy.train.loop import autocast_context, train_epoch
from samstudy.train.schedule import build_scheduler

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "base": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "sam": {
        "name": "sam",
        "base": "sgd",
        "lr": 0.05,
        "rho": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
    },
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cifar_shaped(n: int, device: torch.device, seed: int = 0) -> DeviceLoader:
    """Random CIFAR-shaped data behind the trainer's own device-resident loader."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    noisy = torch.rand(n, generator=gen).to(device) < 0.4
    return DeviceLoader(
        x,
        y,
        y,
        noisy,
        128,
        seed=seed,
        augment=True,
        fill=torch.zeros(3, device=device),
        device=device,
    )


class Case:
    """One model on one loader, with a trainer epoch and a bare epoch over the same batches."""

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_shape: tuple[int, ...],
        loader: Any,
        optimizer: str,
        device: torch.device,
        *,
        bf16: bool = False,
        max_steps: int | None = None,
    ) -> None:
        torch.manual_seed(0)
        self.device, self.bf16, self.loader, self.max_steps = device, bf16, loader, max_steps
        self.channels_last = device.type == "cuda"
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        make = lambda: create_model(model_name, num_classes, in_shape).to(  # noqa: E731
            device, memory_format=memory_format
        )
        self.model, self.bare_model = make(), make()
        self.optimizer = create_optimizer(self.model.named_parameters(), **OPTIMIZERS[optimizer])
        steps = min(len(loader), max_steps or len(loader))
        self.scheduler = build_scheduler(
            self.optimizer, ScheduleConfig(name="cosine"), steps_per_epoch=steps, epochs=1000
        )
        self.passes = 2 if optimizer != "sgd" else 1
        self.bare_opt = torch.optim.SGD(
            self.bare_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4
        )
        loader.set_epoch(0)
        self.batches = [(x, y) for x, y, *_ in list(loader)[:steps]]
        self.samples = sum(len(y) for _, y in self.batches)

    def trainer_epoch(self, epoch: int) -> float:
        start = time.perf_counter()
        self.loader.set_epoch(epoch)
        sums, _ = train_epoch(
            self.model,
            self.optimizer,
            self.scheduler,
            self.loader,
            bf16=self.bf16,
            channels_last=self.channels_last,
            max_steps=self.max_steps,
        )
        sums.tolist()
        self.optimizer.read_stats(reset=True)
        return time.perf_counter() - start

    def step_epoch(self, epoch: int) -> float:
        """Only ``optimizer.train_step`` over the materialised batches: the loop's own cost out."""
        start = time.perf_counter()
        for x, y in self.batches:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(self.device, self.bf16):
                self.optimizer.train_step(self.model, F.cross_entropy, x, y)
        self.optimizer.read_stats(reset=True)
        _sync(self.device)
        return time.perf_counter() - start

    def bare_epoch(self, epoch: int) -> float:
        start = time.perf_counter()
        model, opt = self.bare_model, self.bare_opt
        for x, y in self.batches:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(self.passes):
                with autocast_context(self.device, self.bf16):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start


def _timed(case: Case, repeats: int) -> tuple[float, float, float]:
    """Fastest trainer, train_step-only and bare epoch times after a warm-up, interleaved.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    runs: list[list[float]] = [[], [], []]
    for epoch in range(repeats + 1):
        times = (case.trainer_epoch(epoch), case.step_epoch(epoch), case.bare_epoch(epoch))
        if epoch:  # epoch 0 warms up caches, allocator and lazy initialisation
            for bucket, value in zip(runs, times, strict=True):
                bucket.append(value)
    trainer, step, bare = (min(bucket) for bucket in runs)
    return trainer, step, bare


def overhead_section(quick: bool) -> str:
    """CPU (one thread): digits with the MLP and the small CNN, and a CIFAR-shaped CNN."""
    repeats = 3 if quick else 5
    device = torch.device("cpu")
    digits = build_data("digits", noise_kind="symmetric", noise_rate=0.4, device=device)
    n_cifar = 512 if quick else 2048
    setups: list[tuple[str, Callable[[], Any], str, int, tuple[int, ...]]] = [
        ("digits 8x8, mlp 512x2, batch 64", lambda: digits.train_loader(64, seed=0), "mlp", 10,
         digits.in_shape),
        ("digits 8x8, cnn, batch 64", lambda: digits.train_loader(64, seed=0), "cnn", 10,
         digits.in_shape),
        (f"CIFAR-shaped 3x32x32 (n={n_cifar}, crop+flip), cnn, batch 128",
         lambda: _cifar_shaped(n_cifar, device), "cnn", 10, (3, 32, 32)),
    ]  # fmt: skip
    rows = [
        "| data, model | optimizer | trainer epoch (s) | train_step only (s) | bare passes (s) "
        "| trainer / train_step | trainer / bare | samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, make_loader, model_name, classes, shape in setups:
        for opt in ("sgd", "sam"):
            case = Case(model_name, classes, shape, make_loader(), opt, device)
            trainer, step, bare = _timed(case, repeats)
            rows.append(
                f"| {label} | {opt} | {trainer:.3f} | {step:.3f} | {bare:.3f} "
                f"| {trainer / step:.2f}x | {trainer / bare:.2f}x | {case.samples / trainer:,.0f} |"
            )
    return (
        f"## Trainer overhead (CPU, {torch.get_num_threads()} thread(s), best of {repeats})\n\n"
        "Trainer epoch: loader + `train_step` + lr schedule + on-device metric sums + one read.\n"
        "train_step only: `optimizer.train_step` (and `read_stats`) over the same batches, "
        "materialised: trainer / train_step is the loop's own overhead.\n"
        "Bare: forward/backward (x2 for SAM) + `torch.optim.SGD` step over the same batches: "
        "trainer / bare includes the optimizer's arithmetic and statistics.\n\n"
        + "\n".join(rows)
        + "\n"
    )


def gpu_section(quick: bool, device: torch.device | None = None, n: int | None = None) -> str:
    """ResNet-18, batch 128, bf16, channels_last epochs of SGD and SAM on CIFAR-shaped data."""
    device = device or torch.device("cuda")
    n = n or (10_000 if quick else 50_000)
    bf16 = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)"
    precision = "bf16 autocast, channels_last" if bf16 else "fp32"
    loader = _cifar_shaped(n, device)
    rows = [
        "| optimizer | epoch (s) | samples/s | bare passes (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    epoch_times = {}
    for opt in ("sgd", "sam"):
        case = Case("resnet18", 10, (3, 32, 32), loader, opt, device, bf16=bf16)
        case.trainer_epoch(0)  # warm-up: cuDNN algorithm choice, allocator, lazy init
        _sync(device)
        trainer = case.trainer_epoch(1)
        case.bare_epoch(0)
        bare = case.bare_epoch(1)
        epoch_times[opt] = trainer
        rows.append(
            f"| {opt} | {trainer:.2f} | {case.samples / trainer:,.0f} | {bare:.2f} "
            f"| {trainer / bare:.2f}x |"
        )
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return (
        f"## ResNet-18 on {name} (batch 128, {precision}, n={n})\n\n"
        f"torch {torch.__version__}; one epoch each after a warm-up epoch; "
        f"SAM / SGD epoch time: {epoch_times['sam'] / epoch_times['sgd']:.2f}x\n\n"
        + "\n".join(rows)
        + "\n"
    )


def run(quick: bool) -> str:
    """The markdown section ``python -m benchmarks --only bench_train`` writes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable figures on a shared machine; the lab's CPU recipe too
    try:
        parts = [overhead_section(quick)]
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        parts.append(gpu_section(quick))
    else:
        parts.append("## ResNet-18 on GPU\n\nskipped: CUDA is not available on this machine.\n")
    return "\n".join(parts)
