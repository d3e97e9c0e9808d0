"""Model registry: ``@register_model("name")`` builders and ``create_model`` (timm-style).

A registration may name the model's classifier (timm's ``default_cfg["classifier"]``): the
module whose input is the feature vector. The trainer reads the norm of that input (the
intermediate activations) and of the classifier's weights; ``layer_groups`` splits the
parameters into the groups whose weight norms it logs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

# A builder takes (num_classes, in_shape, **kwargs) and returns a fresh module.
ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}
_CLASSIFIERS: dict[str, str] = {}


def register_model(
    name: str, *, classifier: str | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(num_classes, in_shape, **kwargs)`` under ``name``.

    ``classifier`` is the dotted path of the last layer inside the built module (a negative
    index counts from the end of an ``nn.Sequential``: ``net.-1``); its input is the model's
    feature vector. Leave it out for models without intermediate features (``linear``).
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        if classifier is not None:
            _CLASSIFIERS[name] = classifier
        return builder

    return decorator


def classifier_path(name: str) -> str | None:
    """The classifier a model declared at registration, or None."""
    _get(name)
    return _CLASSIFIERS.get(name)


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` that also takes negative indices into containers (``net.-1``)."""
    node = model
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(node, nn.Sequential | nn.ModuleList):
            node = node[int(part)]
        else:
            node = node.get_submodule(part)
    return node


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by layer group, in registration order.

    A group is a top-level child (``conv1``, ``layer1`` ... ``fc``; ``W`` and ``v``), except
    that a top-level ``nn.Sequential`` of plain layers is split into its layers (``net.1``,
    ``net.3``): an MLP would otherwise be one group.
    """
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        key = parts[0]
        top = model.get_submodule(key)
        if len(parts) > 2 and isinstance(top, nn.Sequential):
            layer = top.get_submodule(parts[1])
            if any(True for _ in layer.parameters(recurse=False)):
                key = f"{parts[0]}.{parts[1]}"
        groups.setdefault(key, []).append(param)
    return groups


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
