"""Study files the study tests share: a small digits + MLP trial that runs in seconds on a CPU."""

from __future__ import annotations

from typing import Any


def digits_sam_base(epochs: int, **extra: Any) -> dict[str, Any]:
    """The ``base:`` of a quick test study (SAM on digits with an MLP, one CPU thread)."""
    return {
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.05},
        "epochs": epochs,
        "threads": 1,
        "device": "cpu",
        **extra,
    }
