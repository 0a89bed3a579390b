"""Constant Tikhonov damping added after the Kronecker product (AdaFisher)."""

from __future__ import annotations

from curvlab.interfaces.damping import DampingPolicy
from curvlab.registry import register
from curvlab.validation import check_range


@register("damping", "constant")
class ConstantDamping(DampingPolicy):
    """``F = H' ⊗ S' + λ`` with a fixed λ > 0 on every entry (default 1e-3, SPEC §3)."""

    mode = "after_product"

    def __init__(self, value: float = 1e-3) -> None:
        self.lam = check_range("damping value", value, 0.0, low_inclusive=False)

    def value(self, step: int) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"ConstantDamping(value={self.lam:g})"
