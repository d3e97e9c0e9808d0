"""CIFAR-style ResNets (He et al. 2016 as adapted for 32x32 inputs: 3x3 stem, no max-pool).

The layout follows the widely used CIFAR port (kuangliu/pytorch-cifar): ResNet-18 has
11,173,962 parameters for 10 classes, the figure papers quote as "11.17M".
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import image_channels, register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50 and deeper), expansion 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem at full resolution, four stages (64..512), global average pool."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            stages.append(self._stage(block, planes, blocks, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model("resnet18", classifier="fc")
def resnet18(num_classes: int, in_shape: tuple[int, ...]) -> ResNet:
    """CIFAR ResNet-18 (11.17M parameters for 10 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, image_channels("resnet18", in_shape))


@register_model("resnet34", classifier="fc")
def resnet34(num_classes: int, in_shape: tuple[int, ...]) -> ResNet:
    """CIFAR ResNet-34 (21.28M parameters for 10 classes)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, image_channels("resnet34", in_shape))


@register_model("resnet50", classifier="fc")
def resnet50(num_classes: int, in_shape: tuple[int, ...]) -> ResNet:
    """CIFAR ResNet-50 with bottleneck blocks (23.52M parameters for 10 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, image_channels("resnet50", in_shape))
