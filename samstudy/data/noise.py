"""Label noise: symmetric, asymmetric (class maps) and human (CIFAR-N label files).

Every draw uses its own generator seeded by the noise seed, never the global RNG, so the noisy
labels of a data set depend on (data, kind, rate, noise seed) only: the same under every
training seed and unchanged by anything the trainer draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .seeding import TAG_ASYMMETRIC, TAG_SYMMETRIC, numpy_rng

NOISE_KINDS = ("none", "symmetric", "asymmetric", "human")

# CIFAR-10 (Patrini et al. 2017, the standard asymmetric setting): truck -> automobile,
# bird -> airplane, deer -> horse, cat <-> dog. Other classes keep their labels.
CIFAR10_ASYM_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# CIFAR-100 fine label -> coarse (superclass) label, as in the data set's own `coarse_labels`.
CIFAR100_COARSE: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip


def cifar100_asym_map() -> dict[int, int]:
    """Each fine class -> the next fine class (by index, cyclically) within its superclass."""
    mapping: dict[int, int] = {}
    for coarse in range(20):
        members = [f for f, c in enumerate(CIFAR100_COARSE) if c == coarse]
        for i, fine in enumerate(members):
            mapping[fine] = members[(i + 1) % len(members)]
    return mapping


def asym_map(name: str, num_classes: int) -> dict[int, int]:
    """The asymmetric class map of data set ``name``: source class -> noisy class.

    CIFAR-10 and CIFAR-100 use the standard maps; every other data set (digits, gaussian) uses
    c -> (c + 1) mod K, which for K = 2 swaps the two classes.
    """
    if name == "cifar10":
        return dict(CIFAR10_ASYM_MAP)
    if name == "cifar100":
        return cifar100_asym_map()
    return {c: (c + 1) % num_classes for c in range(num_classes)}


def symmetric_noise(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> torch.Tensor:
    """Flip exactly ``round(rate * N)`` labels, chosen uniformly, to a uniformly drawn OTHER class.

    So the realised noise rate is exact (every chosen label really changes); with the
    "uniform over all K classes" convention of some papers, rate r here equals r * K / (K - 1)
    there.
    """
    _check_rate(rate)
    if num_classes < 2:
        raise ValueError("symmetric noise needs at least two classes")
    rng = numpy_rng(seed, TAG_SYMMETRIC)
    y = labels.cpu().numpy().astype(np.int64).copy()
    n_flip = int(round(rate * len(y)))
    chosen = rng.permutation(len(y))[:n_flip]
    shift = rng.integers(1, num_classes, size=n_flip)  # 1..K-1: never the same class
    y[chosen] = (y[chosen] + shift) % num_classes
    return torch.from_numpy(y)


def asymmetric_noise(
    labels: torch.Tensor, mapping: dict[int, int], rate: float, seed: int
) -> torch.Tensor:
    """In each source class c of ``mapping``, relabel exactly ``round(rate * n_c)`` samples to
    ``mapping[c]``; classes outside the map keep their labels.

    The samples are chosen from the labels as given (so cat -> dog and dog -> cat both draw from
    the clean cats and dogs).
    """
    _check_rate(rate)
    rng = numpy_rng(seed, TAG_ASYMMETRIC)
    clean = labels.cpu().numpy().astype(np.int64)
    y = clean.copy()
    for source in sorted(mapping):
        target = mapping[source]
        if target == source:
            continue
        members = np.flatnonzero(clean == source)
        n_flip = int(round(rate * len(members)))
        y[rng.permutation(members)[:n_flip]] = target
    return torch.from_numpy(y)


def load_human_labels(
    path: str | Path, key: str, clean_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Read noisy labels from a CIFAR-N file: a ``.pt`` dict (``key`` selects the annotation, e.g.
    ``worse_label``, ``aggre_label``, ``random_label1``; ``noisy_label`` for CIFAR-100N) or a
    ``.npy`` array. Checked against the clean labels' length, the class range, and the file's own
    ``clean_label`` entry when it has one (a mismatch means another sample order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-N label file not found: {path}")
    file_clean = None
    if path.suffix == ".npy":
        raw = np.load(path, allow_pickle=False)
    else:
        content = _safe_torch_load(path)
        if isinstance(content, dict):
            if key not in content:
                raise KeyError(f"{path} has no key {key!r}; keys: {', '.join(map(str, content))}")
            raw = content[key]
            file_clean = content.get("clean_label")
        else:
            raw = content
    noisy = torch.as_tensor(np.asarray(raw)).long().reshape(-1)
    n = len(clean_labels)
    if len(noisy) != n:
        raise ValueError(f"{path}: {len(noisy)} labels for {n} training samples")
    if len(noisy) and (int(noisy.min()) < 0 or int(noisy.max()) >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
    if file_clean is not None:
        file_clean = torch.as_tensor(np.asarray(file_clean)).long().reshape(-1)
        if not torch.equal(file_clean, clean_labels.cpu().long()):
            raise ValueError(
                f"{path}: its clean_label entry disagrees with the data set's labels "
                "(different sample order or data set)"
            )
    return noisy


def _safe_torch_load(path: Path) -> object:
    # CIFAR-N's .pt files are dicts of numpy arrays: allow exactly numpy's array rebuild functions
    # (under both numpy 1 and numpy 2 module names) on top of the weights-only unpickler.
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else None
    allowed: list = [np.ndarray, np.dtype]
    if reconstruct is not None:
        allowed += [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]
    allowed += [type(np.dtype(t)) for t in ("int64", "int32", "int16", "uint8", "float64")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def apply_noise(
    labels: torch.Tensor,
    *,
    dataset: str,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
    label_file: str | Path | None = None,
    label_key: str = "worse_label",
) -> torch.Tensor:
    """Noisy copy of ``labels`` (CPU int64) for noise ``kind``; ``"none"`` returns a copy."""
    labels = labels.cpu().long()
    if kind == "none":
        return labels.clone()
    if kind == "symmetric":
        return symmetric_noise(labels, num_classes, rate, seed)
    if kind == "asymmetric":
        return asymmetric_noise(labels, asym_map(dataset, num_classes), rate, seed)
    if kind == "human":
        if not label_file:
            raise ValueError("noise kind 'human' needs label_file (a CIFAR-N label file)")
        return load_human_labels(label_file, label_key, labels, num_classes)
    raise ValueError(f"unknown noise kind {kind!r}; allowed: {', '.join(NOISE_KINDS)}")


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
