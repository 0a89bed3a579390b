"""ResNet-18 / ResNet-50, CIFAR variant (He et al. 2016): 3×3 stem, no max-pool, BatchNorm.

For 32×32 inputs the ImageNet stem (7×7 stride-2 conv + max-pool) would shrink the image to 8×8
before the first stage, so the CIFAR variant uses a single 3×3 stride-1 convolution instead.
Stages have 64, 128, 256, 512 base channels; stages 2–4 halve the resolution.
Parameter counts for 10 classes: ResNet-18 11,173,962; ResNet-50 23,520,842.
"""

from __future__ import annotations

import gin
import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3×3 Conv–BN layers plus the identity (or a 1×1 Conv–BN projection)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_channels, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4, each followed by BN."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_channels, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """CIFAR ResNet: stem, four stages of ``blocks[i]`` blocks, global average pool, Linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages, width = [], 64
        for i, (channels, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(width, channels, stride))
                width = channels * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@gin.configurable(module="models")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11.2M parameters for 10 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@gin.configurable(module="models")
def resnet50(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 23.5M parameters for 10 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
