"""Min-max normalisation of a factor (AdaFisher)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer
from curvlab.registry import register


@register("normalizers", "minmax")
class MinMaxNormalizer(Normalizer):
    r"""``minmax(x) = (x − min x) / (max x − min x + ε)`` over the whole factor (bias entry
    included), ε = 1e-6 (SPEC §3). The result lies in [0, 1).

    ``map_infinities=True`` first maps +inf to 1 and −inf to 0, as the official code does.
    """

    def __init__(self, eps: float = 1e-6, map_infinities: bool = False) -> None:
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.map_infinities = bool(map_infinities)

    def __call__(self, factor: Tensor, structure: str = "diagonal") -> Tensor:
        if structure != "diagonal":
            raise NotImplementedError(
                f"MinMaxNormalizer handles the 'diagonal' structure here, got {structure!r}"
            )
        x = factor
        if self.map_infinities:
            x = torch.where(x == math.inf, 1.0, x)
            x = torch.where(x == -math.inf, 0.0, x)
        lo, hi = torch.aminmax(x)
        return (x - lo) / (hi - lo + self.eps)

    def __repr__(self) -> str:
        return f"MinMaxNormalizer(eps={self.eps:g}, map_infinities={self.map_infinities})"
