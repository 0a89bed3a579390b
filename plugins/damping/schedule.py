"""λ as a function of the step."""

from __future__ import annotations

from curvlab.interfaces.damping import DAMPING_MODES, DampingPolicy
from curvlab.registry import register
from curvlab.validation import check_choice, check_positive_int, check_range


@register("damping", "step_schedule")
class StepScheduleDamping(DampingPolicy):
    """``λ(t) = max(minimum, value · factor^⌊t / every⌋)``: e.g. start strongly damped and
    relax (factor < 1), as K-FAC practice often does."""

    def __init__(
        self,
        value: float = 1e-1,
        factor: float = 0.5,
        every: int = 100,
        minimum: float = 1e-4,
        mode: str = "after_product",
    ) -> None:
        self.initial = check_range("damping value", value, 0.0, low_inclusive=False)
        self.factor = check_range("factor", factor, 0.0, low_inclusive=False)
        self.every = check_positive_int("every", every)
        self.minimum = check_range("minimum", minimum, 0.0, low_inclusive=False)
        self.mode = check_choice("damping mode", mode, DAMPING_MODES)

    def value(self, step: int) -> float:
        return max(self.minimum, self.initial * self.factor ** (step // self.every))

    def __repr__(self) -> str:
        return (
            f"StepScheduleDamping(value={self.initial:g}, factor={self.factor:g}, "
            f"every={self.every}, minimum={self.minimum:g}, mode={self.mode!r})"
        )
