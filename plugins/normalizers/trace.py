"""Trace normalisation: M' = M · dim / tr(M) (unit mean eigenvalue)."""

from __future__ import annotations

from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer
from curvlab.registry import register


@register("normalizers", "trace")
class TraceNormalizer(Normalizer):
    """``M' = M / (tr(M)/dim + ε)``: the mean entry (diagonal) or mean eigenvalue becomes 1."""

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = float(eps)

    def __call__(self, values: Tensor, structure: str = "diagonal") -> Tensor:
        return values / (values.mean() + self.eps)

    def normalize_matrix(self, matrix: Tensor) -> Tensor:
        # the mean eigenvalue is the mean diagonal entry (tr M / dim, over all groups)
        return matrix / (matrix.diagonal(dim1=-2, dim2=-1).mean() + self.eps)
