"""Seeds derived from tuples of integers, independent of every global RNG."""

from __future__ import annotations

import numpy as np

# Stream tags keep the draws of different purposes apart even when their seeds coincide.
TAG_SYMMETRIC = 1
TAG_ASYMMETRIC = 2
TAG_LOADER = 3
TAG_SUBSET = 4


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (any sign), stable across platforms and numpy versions."""
    entropy = [int(p) % 2**64 for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_rng(*parts: int) -> np.random.Generator:
    """A private numpy generator for the stream ``parts``."""
    return np.random.default_rng(derive_seed(*parts))
