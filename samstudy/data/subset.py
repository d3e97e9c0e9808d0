"""``data.train_fraction``: a stratified share of the training set, drawn before label noise."""

from __future__ import annotations

import numpy as np
import torch

from .seeding import TAG_SUBSET, numpy_rng


def class_quotas(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Samples kept per class: ``round(fraction * N)`` in all, shared in proportion to the
    class sizes (largest remainder; ties go to the lower class index), at least one per
    non-empty class."""
    exact = counts * fraction
    quotas = np.floor(exact).astype(np.int64)
    left = int(round(fraction * int(counts.sum()))) - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -(exact - quotas)))
    quotas[order[: max(left, 0)]] += 1
    return np.maximum(quotas, (counts > 0).astype(np.int64))


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices (ascending, so the source order is kept) of a stratified ``fraction`` of
    ``labels``; the same for the same (labels, fraction, seed), whatever the global RNG."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    y = labels.cpu().numpy()
    if fraction == 1.0:
        return torch.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    keep = []
    for c, quota in zip(classes, class_quotas(counts, fraction), strict=True):
        members = np.flatnonzero(y == c)
        # one permutation per (split seed, class): the draw of a class does not depend on others
        chosen = numpy_rng(TAG_SUBSET, seed, int(c)).permutation(len(members))[:quota]
        keep.append(members[chosen])
    return torch.from_numpy(np.sort(np.concatenate(keep))).long()
