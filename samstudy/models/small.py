"""Small models for CPU studies (digits, 32x32 images) and the linear theory studies."""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import image_channels, register_model


class SmallCNN(nn.Module):
    """Two conv layers (3x3, ReLU, 2x2 max-pool each) and two fully connected layers.

    Works on 1x8x8 digits (feature map 2x2) and 3x32x32 images (8x8).
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int],
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise ValueError(f"cnn needs inputs of at least 4x4 pixels, got {h}x{w}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers of ``width`` units with ReLU, linear read-out."""

    def __init__(self, num_classes: int, in_features: int, width: int, depth: int) -> None:
        super().__init__()
        if depth < 0 or width < 1:
            raise ValueError(f"mlp needs depth >= 0 and width >= 1, got {depth=}, {width=}")
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearModel(nn.Module):
    """f(x) = W x without bias; with ``binary_logit`` a single logit f(x) = <w, x>, shape (B,)."""

    def __init__(
        self, num_classes: int, in_features: int, binary_logit: bool, init_scale: float | None
    ) -> None:
        super().__init__()
        self.binary_logit = _check_binary(num_classes, binary_logit, "linear")
        self.linear = nn.Linear(in_features, 1 if binary_logit else num_classes, bias=False)
        _maybe_init(self, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(torch.flatten(x, 1))
        return out.squeeze(-1) if self.binary_logit else out


class DeepLinear2(nn.Module):
    """2-layer deep linear network f(x) = V W x without biases (binary: f = <v, W x>)."""

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        hidden: int,
        binary_logit: bool,
        init_scale: float | None,
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"linear2 needs hidden >= 1, got {hidden}")
        self.binary_logit = _check_binary(num_classes, binary_logit, "linear2")
        self.W = nn.Linear(in_features, hidden, bias=False)
        self.v = nn.Linear(hidden, 1 if binary_logit else num_classes, bias=False)
        _maybe_init(self, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.v(self.W(torch.flatten(x, 1)))
        return out.squeeze(-1) if self.binary_logit else out


def _check_binary(num_classes: int, binary_logit: bool, name: str) -> bool:
    if binary_logit and num_classes != 2:
        raise ValueError(f"{name}: binary_logit=True needs num_classes == 2, got {num_classes}")
    return binary_logit


def _maybe_init(module: nn.Module, init_scale: float | None) -> None:
    # Theory studies often start from small weights; None keeps PyTorch's default init.
    if init_scale is None:
        return
    if init_scale < 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, init_scale)


@register_model("cnn", classifier="classifier.3")
def cnn(
    num_classes: int,
    in_shape: tuple[int, ...],
    channels: tuple[int, int] | list[int] = (32, 64),
    hidden: int = 128,
) -> SmallCNN:
    """Small CNN: 2 conv (32, 64 channels) + 2 fc (128 hidden units)."""
    image_channels("cnn", in_shape)
    if len(channels) != 2:
        raise ValueError(f"cnn channels must have two entries, got {list(channels)}")
    return SmallCNN(num_classes, in_shape, (int(channels[0]), int(channels[1])), hidden)  # type: ignore[arg-type]


@register_model("mlp", classifier="net.-1")
def mlp(num_classes: int, in_shape: tuple[int, ...], width: int = 512, depth: int = 2) -> MLP:
    """MLP in -> width (x depth) -> classes, ReLU, with biases."""
    return MLP(num_classes, math.prod(in_shape), width, depth)


@register_model("linear")
def linear(
    num_classes: int,
    in_shape: tuple[int, ...],
    binary_logit: bool = False,
    init_scale: float | None = None,
) -> LinearModel:
    """Linear model without bias: (B, num_classes) logits, or (B,) with binary_logit."""
    return LinearModel(num_classes, math.prod(in_shape), binary_logit, init_scale)


@register_model("linear2", classifier="v")
def linear2(
    num_classes: int,
    in_shape: tuple[int, ...],
    hidden: int = 64,
    binary_logit: bool = False,
    init_scale: float | None = None,
) -> DeepLinear2:
    """2-layer linear network f = <v, W x> (no biases, no nonlinearity)."""
    return DeepLinear2(num_classes, math.prod(in_shape), hidden, binary_logit, init_scale)
