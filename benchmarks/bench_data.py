"""Loader throughput: the device-resident loader against a torchvision DataLoader.

Both serve CIFAR-shaped data (random uint8 32x32x3 images, normalised, random crop with 4-pixel
padding and horizontal flip) in batches of 128 to the same device, within one run, so the ratio
is free of machine-to-machine differences. Samples per second over whole epochs, best of the
repeats; the first (warm-up) epoch of each loader is not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from samstudy.data import CIFAR_STATS, DeviceLoader, TorchvisionLoader

BATCH = 128


class _UInt8Images(Dataset):
    """The usual CIFAR training set shape: uint8 HWC arrays through PIL-based transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_rate(
    make_iter: Callable[[int], Iterable], n: int, device: torch.device, repeats: int
) -> float:
    """Best samples/s over ``repeats`` timed epochs after one warm-up epoch."""
    best = 0.0
    for epoch in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        seen = 0
        for batch in make_iter(epoch):
            x = batch[0].to(device, non_blocking=True)
            seen += x.shape[0]
        _sync(device)
        elapsed = time.perf_counter() - start
        assert seen == n
        if epoch > 0:
            best = max(best, n / elapsed)
    return best


def run(quick: bool = False) -> str:
    """Markdown section: samples/s of each loader and the device-loader speed-up."""
    n = 2_560 if quick else 10_000
    repeats = 1 if quick else 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    mean, std = CIFAR_STATS["cifar10"]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean_t) / std_t
    y = torch.from_numpy(labels).long()
    clean = torch.zeros(n, dtype=torch.bool)
    fill = (-mean_t / std_t).view(3)

    tensors = [t.to(device) for t in (x, y, y, clean)]
    dev_loader = DeviceLoader(
        *tensors, BATCH, seed=0, augment=True, fill=fill.to(device), device=device
    )

    def device_epochs(epoch: int) -> Iterable:
        dev_loader.set_epoch(epoch)
        return dev_loader

    standard = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    rows = [("device-resident (samstudy)", device_epochs)]
    worker_counts = [0] if quick else [0, 2]
    for workers in worker_counts:
        tv = DataLoader(
            _UInt8Images(images, labels, standard),
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        rows.append((f"torchvision DataLoader, {workers} workers", lambda _e, tv=tv: tv))
    planned = TorchvisionLoader(x, y, y, clean, BATCH, seed=0, augment=True, fill=fill,
                                device=device)  # fmt: skip

    def planned_epochs(epoch: int) -> Iterable:
        planned.set_epoch(epoch)
        return planned

    rows.append(("samstudy torchvision path, 0 workers", planned_epochs))

    # One thread on a CPU: the 0-worker DataLoader uses one core, and more threads only
    # oversubscribe a shared machine.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rates = [(label, _epoch_rate(make, n, device, repeats)) for label, make in rows]
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    base = rates[1][1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        "## Data loader throughput",
        "",
        f"{n} CIFAR-shaped images (uint8 32x32x3, random), batch {BATCH}, random crop (pad 4) + "
        f"horizontal flip + normalisation, batches delivered to {device} ({name}), "
        f"torch threads {used_threads}; best of {repeats} epoch(s) after a warm-up.",
        "",
        "| loader | samples/s | vs torchvision (0 workers) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {rate:,.0f} | {rate / base:.1f}x |" for label, rate in rates]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick=True))
