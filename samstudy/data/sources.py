"""Raw data sets as CPU tensors: scikit-learn digits, CIFAR-10/100 (torchvision), Gaussian."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from samstudy.paths import absolute_path

# Standard per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# The torchvision classes that read CIFAR, filled on first use: importing torchvision costs seconds
# in every Ray worker, and digits/synthetic trials never need it. Tests put subclasses here whose
# checksums match the files they write, so the real torchvision code (integrity checks included)
# runs unchanged.
TORCHVISION_CLASSES: dict[str, type] = {}


def cifar_class(name: str) -> type:
    """torchvision's reader class for ``cifar10`` / ``cifar100`` (or a test's substitute)."""
    if name not in TORCHVISION_CLASSES:
        import torchvision

        TORCHVISION_CLASSES[name] = {
            "cifar10": torchvision.datasets.CIFAR10,
            "cifar100": torchvision.datasets.CIFAR100,
        }[name]
    return TORCHVISION_CLASSES[name]


SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n_train": 512,
    "n_test": 2048,
    "dim": 32,
    "num_classes": 2,
    "margin": 1.0,
}


def resolve_root(root: str | Path) -> Path:
    """Absolute data root: a relative path is taken from the project root (samstudy.paths)."""
    return absolute_path(root)


class DataNotFoundError(FileNotFoundError):
    """A data set is missing from its root (and could not be downloaded)."""


@dataclass
class RawData:
    """Clean data on the CPU; images are float32 (N, C, H, W), already normalised."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # Per-channel value of a black pixel after normalisation: the fill of crop padding.
    pad_value: torch.Tensor | None = None


def digits_file() -> Path:
    """The digits CSV that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``), found
    without importing scikit-learn: its import (scipy with it) costs a Ray worker's first trial
    about two seconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(f"scikit-learn's digits file is missing: {path}")
    return path


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples per class in a stratified draw of ``draws``: scikit-learn's
    ``utils.extmath._approximate_mode`` (floors, then the largest remainders, ties drawn)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, drawn exactly as scikit-learn's
    ``train_test_split(..., test_size=test_size, random_state=seed, stratify=y)`` draws them
    (its ``StratifiedShuffleSplit``), so a digits trial sees the same split as before; here the
    split no longer moves with the installed scikit-learn version."""
    n_test = math.ceil(test_size * len(y))
    n_train = len(y) - n_test
    _, y_index, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(y_index, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(by_class):
        drawn = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(drawn[: n_i[i]])
        test.extend(drawn[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def load_digits(test_size: float, split_seed: int) -> RawData:
    """scikit-learn's 8x8 digits (read from its shipped file), pixels / 16, stratified split."""
    table = np.loadtxt(digits_file(), delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(int)
    train, test = stratified_split(y, test_size, split_seed)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)

    return RawData(
        images(x[train]),
        torch.from_numpy(y[train]).long(),
        images(x[test]),
        torch.from_numpy(y[test]).long(),
        num_classes=10,
    )


def load_gaussian(synthetic: Mapping[str, Any] | None, seed: int) -> RawData:
    """Class-conditional Gaussians N(mu_y, I) in ``dim`` dimensions, balanced classes.

    Binary: mu = +-margin * u for a random unit vector u (the Bayes boundary passes through the
    origin, as the bias-free linear models need). K > 2: mu_k = margin * u_k with orthonormal u_k
    when K <= dim, random unit vectors otherwise. ``seed`` (the split seed) fixes the data.
    """
    cfg = {**SYNTHETIC_DEFAULTS, **_as_dict(synthetic)}
    unknown = set(cfg) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown synthetic keys {sorted(unknown)}; allowed: {list(SYNTHETIC_DEFAULTS)}"
        )
    k, dim, margin = int(cfg["num_classes"]), int(cfg["dim"]), float(cfg["margin"])
    if k < 2 or dim < 1:
        raise ValueError(f"synthetic data needs num_classes >= 2 and dim >= 1, got {k=}, {dim=}")
    gen = torch.Generator().manual_seed(int(seed))
    if k == 2:
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        means = torch.stack([-u, u])
    elif k <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
        means = q.T
    else:
        means = torch.randn(k, dim, generator=gen, dtype=torch.float64)
        means = means / means.norm(dim=1, keepdim=True)
    means = margin * means

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % k
        y = y[torch.randperm(n, generator=gen)]
        x = means[y] + torch.randn(n, dim, generator=gen, dtype=torch.float64)
        return x.float(), y.long()

    train_x, train_y = sample(int(cfg["n_train"]))
    test_x, test_y = sample(int(cfg["n_test"]))
    return RawData(train_x, train_y, test_x, test_y, num_classes=k)


def cifar_fingerprint(name: str, root: str | Path) -> tuple[Any, ...]:
    """What a load of ``name`` from ``root`` would read: the folder, the reader class (tests put
    their own in ``TORCHVISION_CLASSES``) and each file's name, size and modification time, so
    a data set cached in a process is read again once its files change."""
    cls = cifar_class(name)
    folder = resolve_root(root)
    files: list[tuple[str, int, int]] = []
    with contextlib.suppress(OSError):  # absent: the load says so
        for path in sorted((folder / getattr(cls, "base_folder", "")).iterdir()):
            info = path.stat()
            files.append((path.name, info.st_size, info.st_mtime_ns))
    return (str(folder), cls, tuple(files))


def load_cifar(name: str, root: str | Path, download: bool) -> RawData:
    """CIFAR-10/100 through torchvision, normalised with the standard mean/std.

    A file lock in ``root`` serialises download and verification, so trials starting together
    on one node cannot corrupt a download or read a half-extracted archive.
    """
    cls = cifar_class(name)
    root = resolve_root(root)
    if download:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataNotFoundError(f"{name}: cannot create data root {root}: {err}") from err
    # A read-only root (a shared, pre-filled data folder) needs no lock: nobody writes there.
    writable = root.is_dir() and os.access(root, os.W_OK)
    lock = FileLock(str(root / f".{name}.lock")) if writable else contextlib.nullcontext()
    with lock:
        try:
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(_missing_message(name, cls, root, download, err)) from err
        except OSError as err:  # download attempted without network
            raise DataNotFoundError(_missing_message(name, cls, root, download, err)) from err
    mean, std = CIFAR_STATS[name]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def images(data: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(mean_t).div_(std_t).contiguous()

    return RawData(
        images(train.data),
        torch.tensor(train.targets, dtype=torch.long),
        images(test.data),
        torch.tensor(test.targets, dtype=torch.long),
        num_classes=len(train.classes),
        pad_value=(-mean_t / std_t).view(3),
    )


def _missing_message(name: str, cls: type, root: Path, download: bool, err: Exception) -> str:
    folder = root / cls.base_folder
    how = (
        "the download failed (no network?)"
        if download
        else "set data.download: true where the network allows"
    )
    return (
        f"{name} not found (or corrupted) under data root {root} (expected {folder}): {how}, or "
        f"fetch {cls.url} by hand and extract it into {root} so that {folder} exists "
        f"(e.g. `tar -xzf {cls.filename} -C {root}`). torchvision said: {err}"
    )


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "model_dump"):  # a pydantic SyntheticConfig
        return dict(obj.model_dump())
    return dict(obj)
