"""Refuse parameters without layer curvature: every trainable parameter must be covered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from curvlab.interfaces.fallback import FallbackPolicy
from curvlab.registry import register

if TYPE_CHECKING:  # pragma: no cover
    from curvlab.layers import FallbackParameter


class UncoveredParametersError(ValueError):
    """Raised by ``fallback="error"``: the message names the parameters and the fixes."""


@register("fallbacks", "error")
class ErrorFallback(FallbackPolicy):
    """Construction fails when a trainable parameter has no layer adapter (and the first
    curvature step fails when a paired layer was never captured): a comparison of optimizers
    then cannot silently train part of the model with ~1/λ smaller steps."""

    def check(self, parameters: Sequence[FallbackParameter]) -> None:
        if not parameters:
            return
        listing = "; ".join(str(p) for p in parameters)
        raise UncoveredParametersError(
            f"fallback='error': {len(parameters)} trainable parameter(s) have no layer curvature: "
            f"{listing}. Fix: map the layer class onto an adapter that reads it with "
            f"curvlab.register_layer(LayerClass, 'adapter_name', **options) (docs/layers.md), "
            f"or precondition them anyway with fallback='identity' (F = 1 + λ) or "
            f"fallback='squared_gradient' (their own squared-gradient Fisher)"
        )
