"""No normalisation (K-FAC; the no-min-max ablation of AdaFisher)."""

from __future__ import annotations

from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer, Segments
from curvlab.registry import register


@register("normalizers", "identity")
class IdentityNormalizer(Normalizer):
    """``x ↦ x``."""

    def __call__(self, factor: Tensor, structure: str = "diagonal") -> Tensor:
        return factor

    def normalize_segments(self, flat: Tensor, segments: Segments) -> Tensor:
        return flat

    def normalize_matrix(self, matrix: Tensor) -> Tensor:
        return matrix
