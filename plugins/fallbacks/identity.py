"""The paper's rule for parameters outside supported layers: identity curvature."""

from __future__ import annotations

from curvlab.interfaces.fallback import FallbackPolicy
from curvlab.registry import register


@register("fallbacks", "identity")
class IdentityFallback(FallbackPolicy):
    r"""Identity factors: ``F = 1 + λ`` (``damp_fallback=True``, the paper: "other layers use
    identity factors") or ``F = 1`` exactly (``damp_fallback=False``, the official code).

    The step of such a parameter is the bias-corrected momentum times α / F ≈ α, while a covered
    weight's F = S' ⊗ H' + λ can be as small as λ: its steps can be up to 1/λ (1000× at the
    default λ) larger. Keeps no state.
    """

    def describe(self, constant: str) -> str:
        return (
            f"identity curvature F = {constant}, so their steps are up to 1/λ times smaller than "
            f"those of covered weights (whose F can be as small as λ)"
        )
