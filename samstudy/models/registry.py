"""Model registry: ``@register_model("name")`` builders and ``create_model`` (timm-style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

# A builder takes (num_classes, in_shape, **kwargs) and returns a fresh module.
ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(num_classes, in_shape, **kwargs)`` under ``name``."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def model_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments model ``name`` accepts, with their defaults."""
    builder = _get(name)
    params = list(inspect.signature(builder).parameters.values())[2:]
    return {p.name: p.default for p in params}


def _get(name: str) -> ModelBuilder:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; allowed: {', '.join(available_models())}"
        ) from None


def create_model(
    name: str, num_classes: int, in_shape: tuple[int, ...], **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``in_shape`` (no batch axis).

    Unknown keyword arguments raise ``ValueError`` naming the ones the model accepts, so a typo
    in a study file's ``model.kwargs`` fails before training starts.
    """
    builder = _get(name)
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) or "none"
        raise ValueError(f"model {name!r} got unknown kwargs {unknown}; accepted: {accepted}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return builder(int(num_classes), tuple(int(d) for d in in_shape), **kwargs)


def image_channels(name: str, in_shape: tuple[int, ...]) -> int:
    """Channels of a (C, H, W) input; a clear error for models that need images."""
    if len(in_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got in_shape={in_shape}")
    return in_shape[0]
