"""Min-max normalisation of a factor (AdaFisher)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer, Segments
from curvlab.registry import register


@register("normalizers", "minmax")
class MinMaxNormalizer(Normalizer):
    r"""``M' = (M − m_min I) / (m_max − m_min + ε)``, ε = 1e-6 (SPEC §3; the thesis's proof).

    For a diagonal factor m_min / m_max are its smallest / largest entries (bias entry
    included); for a banded or full factor they are its extreme eigenvalues, so that M' has
    spectrum in [0, 1) like the diagonal case. ``map_infinities=True`` first maps +inf to 1 and
    −inf to 0, as the official code does.
    """

    def __init__(self, eps: float = 1e-6, map_infinities: bool = False) -> None:
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.map_infinities = bool(map_infinities)

    def __call__(self, values: Tensor, structure: str = "diagonal") -> Tensor:
        x = values
        if self.map_infinities:
            x = torch.where(x == math.inf, 1.0, x)
            x = torch.where(x == -math.inf, 0.0, x)
        lo, hi = torch.aminmax(x)
        return (x - lo) / (hi - lo + self.eps)

    def normalize_segments(self, flat: Tensor, segments: Segments) -> Tensor:
        """Every factor at once: per-factor extremes by a scatter reduction, then the same
        elementwise formula as :meth:`__call__` (bitwise the same result)."""
        x = flat
        if self.map_infinities:
            x = torch.where(x == math.inf, 1.0, x)
            x = torch.where(x == -math.inf, 0.0, x)
        ids = segments.ids
        lo = x.new_full((segments.count,), math.inf).scatter_reduce_(0, ids, x, "amin")
        hi = x.new_full((segments.count,), -math.inf).scatter_reduce_(0, ids, x, "amax")
        return (x - lo[ids]) / (hi - lo + self.eps)[ids]

    def __repr__(self) -> str:
        return f"MinMaxNormalizer(eps={self.eps:g}, map_infinities={self.map_infinities})"
