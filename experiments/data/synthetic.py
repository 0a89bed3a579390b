"""A tiny CIFAR-shaped synthetic dataset (no files) for tests and benchmarks."""

from __future__ import annotations

import gin
import torch

from curvlab.experiments.data.embedded import Split


@gin.configurable(module="data")
def synthetic_cifar(
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 1.0,
) -> Split:
    """Random 3×32×32 images: a fixed smooth pattern per class plus Gaussian noise.

    The class patterns make the task learnable (so a loss curve means something), the noise
    keeps it from being trivial. Inputs are roughly standardised; labels are balanced.
    Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 8, 8, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = patterns[y] + noise * torch.randn(n, 3, 32, 32, generator=g)
        return x / (1.0 + noise**2) ** 0.5, y

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    return Split(x_tr, y_tr, x_te, y_te, num_classes)
