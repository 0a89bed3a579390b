"""Constant Tikhonov damping (AdaFisher: added after the Kronecker product)."""

from __future__ import annotations

from curvlab.interfaces.damping import DAMPING_MODES, DampingPolicy
from curvlab.registry import register
from curvlab.validation import check_choice, check_range


@register("damping", "constant")
class ConstantDamping(DampingPolicy):
    """A fixed λ > 0 (default 1e-3, SPEC §3), entering as ``mode`` says (default: after the
    product, on every entry)."""

    def __init__(self, value: float = 1e-3, mode: str = "after_product") -> None:
        self.lam = check_range("damping value", value, 0.0, low_inclusive=False)
        self.mode = check_choice("damping mode", mode, DAMPING_MODES)

    def value(self, step: int) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"ConstantDamping(value={self.lam:g}, mode={self.mode!r})"


@register("damping", "factored")
class FactoredDamping(ConstantDamping):
    """Factored Tikhonov damping with the π-split (Martens & Grosse 2015) for K-FAC:
    ``(A + π√λ I) ⊗ (G + √λ/π I)``."""

    def __init__(self, value: float = 1e-3) -> None:
        super().__init__(value, mode="factored")

    def __repr__(self) -> str:
        return f"FactoredDamping(value={self.lam:g})"
