"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-depth-width with pre-activation blocks.

Matches the authors' CIFAR model and the common PyTorch port: WRN-28-10 has 36,479,194
parameters for 10 classes ("36.5M").
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import image_channels, register_model


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, 1x1 shortcut if needed."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = in_planes == planes and stride == 1
        self.shortcut = (
            nn.Identity()
            if self.equal
            else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        # The projection shortcut sees the pre-activated input, as in the authors' code.
        return out + (x if self.equal else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-width for CIFAR-sized inputs; depth = 6n + 4."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"wide_resnet width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                stride = 1 if (i == 0 or j > 0) else 2
                blocks.append(WideBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The authors' initialisation: He-normal convolutions, unit BN scale, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = torch.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wide_resnet(
    depth: int, width: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
) -> WideResNet:
    """Generic WRN-depth-width (depth = 6n + 4)."""
    return WideResNet(depth, width, num_classes, in_channels, dropout)


@register_model("wide_resnet", classifier="fc")
def _wide_resnet(
    num_classes: int,
    in_shape: tuple[int, ...],
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Any WRN via ``model.kwargs: {depth, width, dropout}``."""
    return wide_resnet(depth, width, num_classes, image_channels("wide_resnet", in_shape), dropout)


@register_model("wrn28_10", classifier="fc")
def wrn28_10(num_classes: int, in_shape: tuple[int, ...], dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (36.5M parameters), the SAM paper's CIFAR model."""
    return wide_resnet(28, 10, num_classes, image_channels("wrn28_10", in_shape), dropout)


@register_model("wrn16_8", classifier="fc")
def wrn16_8(num_classes: int, in_shape: tuple[int, ...], dropout: float = 0.0) -> WideResNet:
    """WRN-16-8 (11.0M parameters), the popular SAM port's README model."""
    return wide_resnet(16, 8, num_classes, image_channels("wrn16_8", in_shape), dropout)


@register_model("wrn40_2", classifier="fc")
def wrn40_2(num_classes: int, in_shape: tuple[int, ...], dropout: float = 0.0) -> WideResNet:
    """WRN-40-2 (2.2M parameters), used in SANER's experiments."""
    return wide_resnet(40, 2, num_classes, image_channels("wrn40_2", in_shape), dropout)
