"""Small models for the embedded datasets."""

from __future__ import annotations

import gin
from torch import nn


class DigitsCNN(nn.Sequential):
    """Conv–BN–ReLU ×2, max-pool, Linear: for 8×8 digits (the README's main job)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, num_classes),
        )


class MLP(nn.Sequential):
    """Fully connected ReLU network."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@gin.configurable(module="models")
def digits_cnn(width: int = 32, num_classes: int = 10) -> nn.Module:
    return DigitsCNN(width, num_classes)


@gin.configurable(module="models")
def mlp(
    in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10
) -> nn.Module:
    return MLP(in_features, tuple(hidden), num_classes)
