"""Data sets (digits, CIFAR-10/100, synthetic Gaussian), label noise and loaders.

``build_data(name, ...)`` returns a :class:`DataBundle` whose ``train_loader`` yields
``(x, y, y_true, noisy, index)`` batches on the device.
"""

from .bundle import DATASETS, DataBundle, build_data, resolve_device
from .loaders import DeviceLoader, SequentialLoader, TorchvisionLoader, crop_flip, epoch_plan
from .noise import (
    CIFAR10_ASYM_MAP,
    CIFAR100_COARSE,
    NOISE_KINDS,
    apply_noise,
    asym_map,
    asymmetric_noise,
    load_human_labels,
    symmetric_noise,
)
from .sources import CIFAR_STATS, TORCHVISION_CLASSES, DataNotFoundError
from .subset import stratified_subset

__all__ = [
    "CIFAR10_ASYM_MAP",
    "CIFAR100_COARSE",
    "CIFAR_STATS",
    "DATASETS",
    "NOISE_KINDS",
    "TORCHVISION_CLASSES",
    "DataBundle",
    "DataNotFoundError",
    "DeviceLoader",
    "SequentialLoader",
    "TorchvisionLoader",
    "apply_noise",
    "asym_map",
    "asymmetric_noise",
    "build_data",
    "crop_flip",
    "epoch_plan",
    "load_human_labels",
    "resolve_device",
    "stratified_subset",
    "symmetric_noise",
]
