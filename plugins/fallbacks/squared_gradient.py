"""The diagonal empirical Fisher of an uncovered parameter itself (its squared gradient)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.interfaces.fallback import FallbackPolicy
from curvlab.interfaces.normalizer import Normalizer
from curvlab.registry import register
from curvlab.validation import check_range

#: per-parameter state keys (in ``optimizer.state[p]``)
EMA_KEY = "fallback_sq_grad"
#: accepted curvature updates so far, in the parameter's dtype (torch.optim casts every state
#: tensor but "step" to it on load), only ever compared with 0
UPDATES_KEY = "fallback_updates"


@register("fallbacks", "squared_gradient")
class SquaredGradientFallback(FallbackPolicy):
    r"""Each uncovered parameter θ is its own "layer" with the diagonal empirical Fisher g²::

        v ← γ v + (1 − γ) g²          on curvature steps (EMA from zero; g = ∂L/∂θ, no weight
                                      decay, as the layers' factors see none)
        F = normalizer(v) + λ         normalised over the whole parameter tensor (min-max for
                                      AdaFisher, like each Kronecker factor), damped like the
                                      layers' factors

    so covered and uncovered parameters sit on one scale: normalised curvature in [0, 1) plus λ.
    Until a parameter's first accepted update its normalised curvature is 1 (``F = 1 + λ``), as
    a layer's factors are identity until theirs. A skipped (non-finite) step leaves ``v``
    unchanged. State per parameter, saved with the optimizer: ``fallback_sq_grad`` (v, the
    parameter's dtype) and ``fallback_updates`` (accepted updates, 0-dim). As with a layer, a
    parameter whose v is constant (a single entry) normalises to 0 under min-max: F = λ.

    A Kronecker factor pair needs the layer's inputs and output gradients; a parameter without
    an adapter has only its gradient, so this is the diagonal Fisher of the parameter in the
    empirical-Fisher sense that AdaFisher uses (paper Sec. 3), without Kronecker structure.

    Args:
        gamma: the EMA decay; ``None`` (default) uses the optimizer's γ, as the layers do.
    """

    def __init__(self, gamma: float | None = None) -> None:
        if gamma is not None:
            check_range("fallbacks.squared_gradient gamma", gamma, 0.0, 1.0, high_inclusive=False)
        self.gamma = None if gamma is None else float(gamma)

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[dict[str, Tensor]],
        ok: Tensor,
        gamma: float,
    ) -> None:
        if self.gamma is not None:
            gamma = self.gamma
        for param, grad, state in zip(params, grads, states):
            v = state.get(EMA_KEY)
            if v is None:
                v = state[EMA_KEY] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state[UPDATES_KEY] = torch.zeros((), dtype=param.dtype, device=param.device)
            flag = ok.to(v.device)
            g = grad.to(v.dtype)
            # torch.where, not a Python branch: no host-device synchronisation, and the NaN of a
            # skipped step never reaches v
            v.copy_(torch.where(flag, gamma * v + (1.0 - gamma) * (g * g), v))
            state[UPDATES_KEY].add_(flag.to(state[UPDATES_KEY].dtype))

    def curvature(
        self, param: Tensor, state: dict[str, Tensor], normalizer: Normalizer
    ) -> Tensor | None:
        v = state.get(EMA_KEY)
        if v is None:
            return None
        flat = v.reshape(-1).to(torch.promote_types(v.dtype, torch.float32))
        normalized = normalizer(flat, "diagonal").view(param.shape)
        return torch.where(state[UPDATES_KEY] > 0, normalized, 1.0)

    def describe(self, constant: str) -> str:
        return (
            "their own diagonal empirical Fisher, F = normalizer(EMA of g²) + λ "
            f"(F = {constant} until their first curvature step)"
        )

    def __repr__(self) -> str:
        return f"SquaredGradientFallback(gamma={self.gamma!r})"
