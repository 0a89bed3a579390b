"""CIFAR augmentation as a batched, seeded, torch-only transform.

Random crop with zero padding (4 pixels), horizontal flip (p = 0.5) and Cutout (DeVries & Taylor
2017: one square of side ``cutout`` zeroed at a uniformly random centre, clipped at the border).
Inputs are already standardised, so zero padding / zeroing is "the mean colour".
Applied per mini-batch inside the training loop (``train.augment = True``).
"""

from __future__ import annotations

import gin
import torch
from torch import Tensor


@gin.configurable(module="data")
class CifarAugment:
    """``augment(x)`` for ``x`` of shape (B, C, H, W); one generator, so runs are reproducible."""

    def __init__(
        self, padding: int = 4, flip: bool = True, cutout: int = 16, seed: int = 0
    ) -> None:
        if padding < 0 or cutout < 0:
            raise ValueError(f"padding and cutout must be >= 0, got {padding} and {cutout}")
        self.padding, self.flip, self.cutout = padding, flip, cutout
        self.generator = torch.Generator().manual_seed(seed)

    def _randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)

    def __call__(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        device = x.device
        if self.padding:
            p = self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = self._randint(2 * p + 1, b).to(device)
            ox = self._randint(2 * p + 1, b).to(device)
            rows = (oy[:, None] + torch.arange(h, device=device))[:, :, None]  # (B, H, 1)
            cols = (ox[:, None] + torch.arange(w, device=device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = (torch.rand(b, generator=self.generator) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cutout:
            cy = self._randint(h, b).to(device)[:, None, None]
            cx = self._randint(w, b).to(device)[:, None, None]
            half = self.cutout // 2
            ys = torch.arange(h, device=device)[None, :, None]
            xs = torch.arange(w, device=device)[None, None, :]
            hole = (ys >= cy - half) & (ys < cy - half + self.cutout)
            hole = hole & (xs >= cx - half) & (xs < cx - half + self.cutout)
            x = x.masked_fill(hole[:, None], 0.0)
        return x.contiguous()
