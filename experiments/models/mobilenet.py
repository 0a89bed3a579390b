"""MobileNetV3-small (Howard et al. 2019), adapted to 32×32 inputs.

Inverted-residual blocks: 1×1 expansion, k×k depthwise convolution, optional squeeze-excitation,
1×1 linear projection; ReLU in the early blocks and hardswish later. The layer table is the
paper's (Table 2). For 32×32 images the stem and the first block use stride 1 instead of 2, so
the last feature map is 4×4 rather than 1×1.
"""

from __future__ import annotations

import gin
from torch import Tensor, nn
from torch.nn import functional as F

#: (kernel, expanded channels, out channels, squeeze-excitation, activation, stride)
SMALL_BLOCKS: tuple[tuple[int, int, int, bool, str, int], ...] = (
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hardswish", 2),
    (5, 240, 40, True, "hardswish", 1),
    (5, 240, 40, True, "hardswish", 1),
    (5, 120, 48, True, "hardswish", 1),
    (5, 144, 48, True, "hardswish", 1),
    (5, 288, 96, True, "hardswish", 2),
    (5, 576, 96, True, "hardswish", 1),
    (5, 576, 96, True, "hardswish", 1),
)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never going more than 10% below ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "hardswish": nn.Hardswish}[name]()


class ConvBNAct(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
        act: str | None = "hardswish",
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(_activation(act))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x · hardsigmoid(W₂ ReLU(W₁ avgpool(x))), the 1×1 convs written as Conv2d."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels / 4)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(
        self,
        blocks: tuple[tuple[int, int, int, bool, str, int], ...] = SMALL_BLOCKS,
        num_classes: int = 10,
        last_channels: int = 1024,
        dropout: float = 0.2,
        in_channels: int = 3,
        small_input: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(in_channels, 16, 3, 1 if small_input else 2)]
        cin = 16
        for i, (kernel, expanded, cout, se, act, stride) in enumerate(blocks):
            if small_input and i == 0:
                stride = 1
            layers.append(InvertedResidual(cin, kernel, expanded, cout, se, act, stride))
            cin = cout
        layers.append(ConvBNAct(cin, 6 * cin, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(6 * cin, last_channels),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@gin.configurable(module="models")
def mobilenet_v3_small(
    num_classes: int = 10, dropout: float = 0.2, in_channels: int = 3
) -> nn.Module:
    """MobileNetV3-small for 32×32 images (hardswish, squeeze-excitation, depthwise convs)."""
    return MobileNetV3(SMALL_BLOCKS, num_classes, 1024, dropout, in_channels, small_input=True)
