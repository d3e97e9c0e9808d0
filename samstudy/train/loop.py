"""One trial, top to bottom: config -> data, model, optimizer, schedule -> epochs -> metrics.

``run_trial`` knows nothing of Ray or MLflow: it validates a plain mapping, trains, and hands
``report(metrics, checkpoint)`` one flat metrics dict per epoch. Every optimizer preset goes
through ``optimizer.train_step`` (one code path), and the loop never reads a value back to the
host inside an epoch: batch statistics are summed on the device and read once at its end.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from samstudy.data import build_data, resolve_device
from samstudy.identity import PLACEMENT_PATHS
from samstudy.models import create_model
from samstudy.optim import create_optimizer
from samstudy.train.checkpoint import (
    CHECKPOINT_FORMAT,
    detached_copy,
    rng_state,
    seed_everything,
    set_rng_state,
)
from samstudy.train.config import TrialConfig, load_trial_config
from samstudy.train.metrics import NUM_SUMS, batch_sums, classification_loss, predictions, summarize
from samstudy.train.norms import NORM_BATCH_SIZE, NormProbe
from samstudy.train.schedule import build_scheduler
from samstudy.train.sharpness import measure_sharpness

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EVAL_BATCH_SIZE = 512
# Config fields (dotted) that may differ between a checkpoint and the run resuming it: they do not
# change the trajectory (threads, checkpoint cadence, loader workers) or only say where to run it
# (device, data folder): the placement fields that are no part of a trial's id. And how often the
# optimizer measures its statistics (they never change an update; its default went from 4 to 32,
# and checkpoints record the value in force when they were made).
RESUME_MAY_DIFFER = frozenset({*PLACEMENT_PATHS, "optimizer.stats_every"})


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when asked for, otherwise a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_epoch(
    model: nn.Module,
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    loss_fn: LossFn = classification_loss,
    bf16: bool = False,
    channels_last: bool = False,
    max_steps: int | None = None,
) -> tuple[torch.Tensor, float]:
    """One pass over ``batches`` of ``(x, y, y_true, noisy, index)``; no host sync inside.

    Returns the epoch's metric sums (still on the device, ``SUM_FIELDS`` order) and the lr of
    its last step. The scheduler steps after every optimizer step.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(NUM_SUMS, dtype=torch.float64, device=device)
    lr = float(optimizer.param_groups[0]["lr"])
    model.train()
    for step, (x, y, y_true, noisy, _index) in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, bf16):
            _loss, logits = optimizer.train_step(model, loss_fn, x, y)
        sums += batch_sums(logits, y, y_true, noisy)
        lr = float(optimizer.param_groups[0]["lr"])  # a Python float: no device read
        if scheduler is not None:
            scheduler.step()
    return sums, lr


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    loss_fn: LossFn = classification_loss,
    bf16: bool = False,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean loss and accuracy over ``(x, y, ...)`` batches, in eval mode, read once at the end."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    was_training = model.training
    model.eval()
    for x, y, *_ in batches:
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, bf16):
            logits = model(x)
        n = y.shape[0]
        sums += torch.stack(
            [
                loss_fn(logits, y).double() * n,
                (predictions(logits) == y).sum().double(),
                sums.new_full((), float(n)),
            ]
        )
    model.train(was_training)
    loss, correct, count = sums.tolist()
    return loss / max(count, 1.0), correct / max(count, 1.0)


def _sharpness_batch(data: Any, cfg: TrialConfig, device: torch.device) -> tuple[Any, Any]:
    """A fixed batch of training inputs and (noisy) training labels, the same every epoch."""
    loader = data.train_loader(
        cfg.sharpness.batch_size,
        seed=cfg.seed,
        augment=False,
        loader=cfg.data.loader,
        num_workers=0,
        device=device,
    )
    loader.set_epoch(0)
    x, y, *_ = next(iter(loader))
    return x.to(device), y.to(device)


def _norm_batch(data: Any, device: torch.device) -> torch.Tensor:
    """The inputs of the activation norms: the same training samples every epoch and in every
    trial of a data set (a fixed permutation's first ``NORM_BATCH_SIZE``), no augmentation.

    Indexed from the bundle with a private generator: no loader, so no global random state is
    drawn and the trajectory does not change.
    """
    n = data.num_train
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:NORM_BATCH_SIZE]
    return data.train_x[order.to(data.train_x.device)].to(device)


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted paths where two config dumps differ (``RESUME_MAY_DIFFER`` ignored)."""

    def walk(a: Any, b: Any, path: str) -> Iterator[str]:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                dotted = f"{path}.{key}" if path else str(key)
                if dotted in RESUME_MAY_DIFFER:
                    continue
                yield from walk(a.get(key), b.get(key), dotted)
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
            if list(a) != list(b):
                yield path
        elif a != b:
            yield path

    return list(walk(saved, current, ""))


def run_trial(
    config: Mapping[str, Any],
    report: Report,
    resume: dict[str, Any] | None = None,
    checkpoint_now: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train one trial, calling ``report(metrics, checkpoint)`` once per epoch.

    ``checkpoint`` is ``None`` or a weights-only-loadable dict; passing it back as ``resume``
    continues the same trajectory. It comes every ``checkpoint_every`` epochs, and after any
    epoch where ``checkpoint_now()`` says so (a study being stopped). Returns the last metrics
    dict (``status`` is ``completed`` or ``diverged``).
    """
    # ---- config, threads, device, seeds -----------------------------------------------------
    cfg = load_trial_config(dict(config))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    channels_last = device.type == "cuda"
    seed_everything(cfg.seed)

    # ---- data (noise has its own seed; the loader's order comes from (seed, epoch)) ---------
    data = build_data(
        cfg.data.name,
        root=cfg.data.root,  # relative paths: from the project root (build_data resolves them)
        download=cfg.data.download,
        test_size=cfg.data.test_size,
        split_seed=cfg.data.split_seed,
        train_fraction=cfg.data.train_fraction,
        synthetic=cfg.data.synthetic.model_dump(),
        noise_kind=cfg.noise.kind,
        noise_rate=cfg.noise.rate,
        noise_seed=cfg.noise.seed,
        label_file=cfg.noise.label_file,
        label_key=cfg.noise.label_key,
        device=device,
    )
    train_loader = data.train_loader(
        cfg.batch_size,
        seed=cfg.seed,
        augment=cfg.data.augment,
        loader=cfg.data.loader,
        num_workers=cfg.data.num_workers,
        device=device,
    )
    test_loader = data.test_loader(EVAL_BATCH_SIZE, device=device)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    # ---- model, optimizer (any preset), per-step lr schedule --------------------------------
    model = create_model(cfg.model.name, data.num_classes, data.in_shape, **cfg.model.kwargs)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model.named_parameters(), cfg.optimizer)
    scheduler = build_scheduler(
        optimizer, cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs
    )
    sharp_batch = _sharpness_batch(data, cfg, device) if cfg.sharpness.every else None
    norms = NormProbe(model, cfg.model.name, _norm_batch(data, device), channels_last=channels_last)

    # ---- resume: weights, optimizer and scheduler state, RNG streams, history --------------
    history: list[dict[str, Any]] = []
    best_acc, best_epoch = -math.inf, 0
    start_epoch = 1
    if resume is not None:
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {resume.get('format')!r}")
        differ = _config_differences(resume["config"], cfg.model_dump())
        if differ:
            raise ValueError(f"checkpoint was made with a different config at: {', '.join(differ)}")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        history = [dict(m) for m in resume["history"]]
        best_acc, best_epoch = float(resume["best_test_acc"]), int(resume["best_epoch"])
        start_epoch = int(resume["epoch"]) + 1
        if start_epoch > cfg.epochs:  # the checkpoint is of the last epoch: nothing left
            return {**history[-1], "status": "completed"}

    # ---- epochs -----------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        train_loader.set_epoch(epoch)
        sums, lr = train_epoch(
            model,
            optimizer,
            scheduler,
            train_loader,
            bf16=bf16,
            channels_last=channels_last,
            max_steps=steps_per_epoch,
        )
        # the epoch's one read of the training sums, the weight and the activation norms
        host = torch.cat([sums, norms.measure()]).tolist()
        host_sums = host[:NUM_SUMS]
        train_time = time.perf_counter() - epoch_start
        train = summarize(host_sums)
        train |= dict(zip(norms.names, host[NUM_SUMS:], strict=True))
        stats = optimizer.read_stats(reset=True)

        test_loss, test_acc = evaluate(model, test_loader, bf16=bf16, channels_last=channels_last)
        if test_acc > best_acc:
            best_acc, best_epoch = test_acc, epoch

        metrics = {"epoch": epoch, "lr": lr, **train, "test_loss": test_loss, "test_acc": test_acc}
        metrics |= {"best_test_acc": best_acc, "best_epoch": best_epoch}
        metrics |= {key: float(value) for key, value in stats.items()}
        if sharp_batch is not None and epoch % cfg.sharpness.every == 0:
            metrics |= measure_sharpness(
                model,
                classification_loss,
                *sharp_batch,
                power_iters=cfg.sharpness.power_iters,
                hutchinson_samples=cfg.sharpness.hutchinson_samples,
                seed=cfg.seed * 100_003 + epoch,  # own stream: the trajectory does not change
            )
        metrics["epoch_time"] = time.perf_counter() - epoch_start
        metrics["samples_per_sec"] = host_sums[0] / train_time if train_time > 0 else math.nan

        # A non-finite loss anywhere in the epoch makes the epoch's loss sum non-finite.
        diverged = not math.isfinite(metrics["train_loss"])
        last = diverged or epoch == cfg.epochs
        metrics["status"] = "diverged" if diverged else ("completed" if last else "running")
        history.append(dict(metrics))

        checkpoint = None
        due = bool(cfg.checkpoint_every) and epoch % cfg.checkpoint_every == 0
        if not diverged and (due or (checkpoint_now is not None and checkpoint_now())):
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "config": detached_copy(cfg.model_dump()),
                "model": detached_copy(model.state_dict()),
                "optimizer": detached_copy(optimizer.state_dict()),
                "scheduler": detached_copy(scheduler.state_dict()),
                "rng": rng_state(),
                "history": detached_copy(history),
                "best_test_acc": best_acc,
                "best_epoch": best_epoch,
            }
        report(dict(metrics), checkpoint)
        if diverged:
            break
    return metrics
