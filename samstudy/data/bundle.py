"""``build_data``: a data set with its label noise, as tensors, and its loaders."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from samstudy.paths import absolute_path

from .loaders import DeviceLoader, SequentialLoader, TorchvisionLoader
from .noise import NOISE_KINDS, apply_noise
from .sources import RawData, cifar_fingerprint, load_cifar, load_digits, load_gaussian
from .subset import stratified_subset

DATASETS = ("digits", "cifar10", "cifar100", "gaussian")
# Share of the device's free memory the data may take before it stays on the CPU.
DEVICE_FRACTION = 0.5

LoaderKind = Literal["auto", "device", "torchvision"]


@dataclass
class DataBundle:
    """One data set with its (possibly noisy) training labels.

    ``train_y`` are the labels to train on, ``train_y_true`` the clean ones and ``train_noisy``
    marks where they differ. Tensors live on ``device`` when they fit there, on the CPU otherwise.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_y_true: torch.Tensor
    train_noisy: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, ...]
    device: torch.device
    augmentable: bool = False
    pad_value: torch.Tensor | None = None
    noise_kind: str = "none"

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_test(self) -> int:
        return len(self.test_y)

    @property
    def noise_rate(self) -> float:
        """Realised share of training labels that differ from the clean ones."""
        return float(self.train_noisy.float().mean()) if self.num_train else 0.0

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        augment: bool = True,
        loader: LoaderKind = "auto",
        num_workers: int = 0,
        device: str | torch.device | None = None,
    ) -> DeviceLoader | TorchvisionLoader:
        """Shuffled training batches ``(x, y, y_true, noisy, index)`` on ``device``.

        Call ``set_epoch(epoch)`` before each epoch: order and augmentation are a function of
        (seed, epoch). ``augment`` (random crop with 4-pixel padding, horizontal flip) applies to
        image data sets that support it (CIFAR) and is ignored for the others. ``loader="auto"``
        picks the device-resident loader when the data lives on ``device`` (always on a CPU), the
        torchvision DataLoader otherwise.
        """
        target = self._target(device)
        if loader not in ("auto", "device", "torchvision"):
            raise ValueError(f"unknown loader {loader!r}; allowed: auto, device, torchvision")
        if loader == "auto":
            on_target = _same_device(self.train_x.device, target) or target.type == "cpu"
            loader = "device" if on_target else "torchvision"
        tensors = (self.train_x, self.train_y, self.train_y_true, self.train_noisy)
        common = {
            "seed": seed,
            "augment": bool(augment and self.augmentable),
            "fill": self.pad_value,
            "device": target,
        }
        if loader == "device":
            return DeviceLoader(*tensors, batch_size, **common)
        return TorchvisionLoader(*tensors, batch_size, num_workers=num_workers, **common)

    def test_loader(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> SequentialLoader:
        """Test batches in order, no augmentation; same tuple (``y_true`` = ``y``, none noisy)."""
        clean = torch.zeros_like(self.test_y, dtype=torch.bool)
        return SequentialLoader(
            self.test_x, self.test_y, self.test_y, clean, batch_size, self._target(device)
        )

    def train_eval_loader(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> SequentialLoader:
        """Training set in order without augmentation (e.g. memorisation at the epoch's end)."""
        return SequentialLoader(
            self.train_x,
            self.train_y,
            self.train_y_true,
            self.train_noisy,
            batch_size,
            self._target(device),
        )

    def _target(self, device: str | torch.device | None) -> torch.device:
        return self.device if device is None else resolve_device(device)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; a bare ``cuda`` gets the current index.

    Raises ``ValueError`` when CUDA is asked for but not available (one message, no traceback).
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _fits(nbytes: int, device: torch.device, fraction: float) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


# What a process keeps between trials (a reused Ray worker runs trial after trial on one data
# set): the last raw data set loaded (CIFAR: seconds of reading, checking and normalising) and
# its images on the last device used. One of each, so a worker that changes data set or device
# frees the old one. Nothing downstream writes into these tensors (loaders gather, augmentation
# builds new ones).
_RAW: dict[tuple, RawData] = {}
_PLACED: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, load: Callable[[], RawData]) -> tuple[tuple, RawData]:
    """``(key, raw)``: the raw data set of ``key``, loaded by ``load`` unless this process
    loaded it last."""
    if key not in _RAW:
        _RAW.clear()
        _PLACED.clear()
        _RAW[key] = load()
    return key, _RAW[key]


def _on_device(key: tuple, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied once per (``key``, device) for as long as the data set
    stays the process's last; ``key`` names where the tensor came from."""
    if tensor.device == device:
        return tensor
    if key[-1] is False:  # a subset: its own tensor, not cached
        return tensor.to(device)
    slot = (*key, str(device))
    if slot not in _PLACED:
        for old in [k for k in _PLACED if k[1] == key[1]]:
            del _PLACED[old]  # one device copy per part
        _PLACED[slot] = tensor.to(device)
    return _PLACED[slot]


def clear_cache() -> None:
    """Forget the data this process keeps between trials (tests; freeing device memory)."""
    _RAW.clear()
    _PLACED.clear()


def build_data(
    name: str,
    *,
    root: str | Path = "data",
    download: bool = False,
    test_size: float = 0.2,
    split_seed: int = 0,
    train_fraction: float = 1.0,
    synthetic: Mapping[str, Any] | None = None,
    noise_kind: str = "none",
    noise_rate: float = 0.0,
    noise_seed: int = 0,
    label_file: str | Path | None = None,
    label_key: str = "worse_label",
    device: str | torch.device = "cpu",
    device_fraction: float = DEVICE_FRACTION,
) -> DataBundle:
    """Load data set ``name``, apply label noise, and place the tensors on ``device``.

    Arguments are named like the fields of ``DataConfig`` / ``NoiseConfig`` (``noise_*`` for
    the noise fields). Relative ``root`` and ``label_file`` are taken from the project root
    (``samstudy.paths``). The data moves to ``device`` when it takes at most ``device_fraction`` of
    the device's free memory; otherwise it stays on the CPU and the torchvision loader serves it.
    ``train_fraction`` < 1 keeps a stratified share of the training set (drawn from
    ``split_seed``) before the noise is drawn on it; the test set stays whole.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise_kind!r}; allowed: {', '.join(NOISE_KINDS)}")
    raw: RawData
    if name == "digits":
        key, raw = _cached(
            (name, test_size, split_seed), lambda: load_digits(test_size, split_seed)
        )
    elif name == "gaussian":
        spec = json.dumps(synthetic or {}, sort_keys=True)
        key, raw = _cached((name, spec, split_seed), lambda: load_gaussian(synthetic, split_seed))
    else:
        key, raw = _cached(
            (name, *cifar_fingerprint(name, root)), lambda: load_cifar(name, root, download)
        )
    whole = train_fraction == 1.0
    keep = stratified_subset(raw.train_y, train_fraction, split_seed)
    if noise_kind != "human" and not whole:  # noise is drawn on the subset: its rate is its own
        raw = replace(raw, train_x=raw.train_x[keep], train_y=raw.train_y[keep])
    noisy_y = apply_noise(
        raw.train_y,
        dataset=name,
        num_classes=raw.num_classes,
        kind=noise_kind,
        rate=noise_rate,
        seed=noise_seed,
        label_file=absolute_path(label_file) if label_file else None,
        label_key=label_key,
    )
    if noise_kind == "human" and not whole:  # CIFAR-N labels name every sample: then subset
        raw = replace(raw, train_x=raw.train_x[keep], train_y=raw.train_y[keep])
        noisy_y = noisy_y[keep]
    target = resolve_device(device)
    tensors = [raw.train_x, noisy_y, raw.train_y, noisy_y != raw.train_y, raw.test_x, raw.test_y]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    place = target if _fits(nbytes, target, device_fraction) else torch.device("cpu")
    train_y, train_y_true, train_noisy, test_y = (t.to(place) for t in tensors[1:4] + tensors[5:])
    # The images are the same for every trial of the data set: moved to the device once.
    train_x = _on_device((key, "train", whole), raw.train_x, place)
    test_x = _on_device((key, "test"), raw.test_x, place)
    return DataBundle(
        name=name,
        train_x=train_x,
        train_y=train_y,
        train_y_true=train_y_true,
        train_noisy=train_noisy,
        test_x=test_x,
        test_y=test_y,
        num_classes=raw.num_classes,
        in_shape=tuple(raw.train_x.shape[1:]),
        device=place,
        augmentable=name in ("cifar10", "cifar100"),
        pad_value=None if raw.pad_value is None else raw.pad_value.to(place),
        noise_kind=noise_kind,
    )
