"""Part 3 of the GPU bench (``bench_gpu``): trials sharing one GPU through Ray's fractional GPUs.

Each trial is a Ray task asking for 1, 0.5 or 0.25 GPU that trains SAM on its own data with the
trainer's ``train_epoch`` on the device it finds (CUDA when Ray gave it one, else the CPU: the
CPU test runs on a Ray with a logical GPU). An actor barrier starts the timed epochs together.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.bench_gpu import SHARED_4_MIN, Sizes, Trainer, make_loader, sync, verdict


def share_trial(sizes: Sizes, seed: int, threads: int, barrier: Any) -> dict[str, Any]:
    """One trial in a Ray task: SAM on its own data, started with the others (``barrier``)."""
    import ray

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(sizes.images, sizes.batch, device, seed=seed)
    trainer = Trainer(sizes.model, {"name": "sam"}, device, bf16="bf16" in sizes.precisions)
    trainer.warm_up(loader, sizes.warmup_steps)
    ray.get(barrier.wait.remote())  # all trials warm: the timed epochs overlap from the start
    sync(device)
    start = time.time()  # wall clock: comparable across the worker processes of one machine
    for _ in range(sizes.share_epochs):
        trainer.epoch_on(loader)
    end = time.time()
    return {"samples": sizes.images * sizes.share_epochs, "start": start, "end": end,
            "device": str(device)}  # fmt: skip


class Barrier:
    """Ray actor (async): ``wait`` returns once ``parties`` callers have arrived."""

    def __init__(self, parties: int) -> None:
        import asyncio

        self.parties, self.arrived, self.event = parties, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        await self.event.wait()


def sharing_section(sizes: Sizes) -> tuple[str, list[bool]]:
    """Uses the running Ray (a test starts one with a logical GPU), else starts one GPU's worth."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1.0)) / max(sizes.share_counts)
        remote_trial = ray.remote(share_trial)
        barrier_cls = ray.remote(num_cpus=0)(Barrier)
        results: dict[int, tuple[float, float, str]] = {}
        for count in sizes.share_counts:
            barrier = barrier_cls.remote(count)
            futures = [
                remote_trial.options(num_gpus=1 / count, num_cpus=cpus, max_retries=0).remote(
                    sizes, seed, max(1, int(cpus)), barrier
                )
                for seed in range(count)
            ]
            trials = ray.get(futures)
            window = max(t["end"] for t in trials) - min(t["start"] for t in trials)
            total = sum(t["samples"] for t in trials)
            per_trial = statistics.mean(t["samples"] / (t["end"] - t["start"]) for t in trials)
            results[count] = (total / window, per_trial, trials[0]["device"])
            ray.kill(barrier)
    finally:
        if started:
            ray.shutdown()
    alone = results[min(results)][0]
    rows = [
        "| trials sharing the GPU | GPU per trial | trial device | samples/s per trial "
        f"| aggregate samples/s | vs one alone | 4 sharing >= {SHARED_4_MIN}x one alone |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    ok: list[bool] = []
    for count, (aggregate, per_trial, dev) in results.items():
        gain = aggregate / alone
        cell = "-"
        if count == 4:
            ok.append(gain >= SHARED_4_MIN)
            cell = verdict(ok[-1])
        rows.append(
            f"| {count} | {1 / count:g} | {dev} | {per_trial:,.0f} | {aggregate:,.0f} "
            f"| {gain:.2f}x | {cell} |"
        )
    text = (
        f"### Trials sharing one GPU (Ray tasks with fractional GPUs, SAM, {sizes.share_epochs} "
        f"epoch(s) of {sizes.images:,} images each, {cpus:g} CPU per task)\n\n"
        "Each trial warms up, waits for the others, then trains; aggregate samples/s = all "
        "trials' samples / (last end - first start).\n\n" + "\n".join(rows) + "\n"
    )
    return text, ok
