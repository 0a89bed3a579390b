"""AdaFisher and AdaFisherW updates (Algorithm 1 of the thesis)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.interfaces.update import Preconditioner, UpdateRule
from curvlab.registry import register
from curvlab.validation import check_range


@register("updates", "adafisher")
class AdaFisherUpdate(UpdateRule):
    r"""Bias-corrected momentum preconditioned by the Fisher diagonal, no square root::

        g ← g + κ θ                      (coupled L2, unless decoupled)
        m ← β m + (1−β) g,   m̂ = m / (1 − β^t)
        θ ← θ − α (F^{-p} m̂ [+ κ θ if decoupled])

    ``p = power`` is 1 for AdaFisher and 0.5 for the square-root ablation. ``t`` counts the
    parameter's accepted steps. A skipped step (``ok`` False) changes nothing.
    Param-group keys: ``lr`` (α), ``beta`` (β), ``weight_decay`` (κ).
    """

    hyperparameters: dict[str, Any] = {}

    def __init__(self, decoupled_weight_decay: bool = False, power: float = 1.0) -> None:
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.power = check_range("power", power, 0.0, low_inclusive=False)

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "step": torch.zeros((), dtype=torch.float32, device=param.device),
        }

    def update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        precond: Preconditioner,
        ok: Tensor,
    ) -> None:
        lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
        okf = ok.to(torch.float32)
        # a skipped step sees zero gradients and keeps β=1: m, t and θ stay as they are
        grads = [torch.where(ok, g, 0.0) for g in grads]
        if wd != 0 and not self.decoupled_weight_decay:
            grads = torch._foreach_add(grads, params, alpha=wd)
        exp_avgs = [s["exp_avg"] for s in states]
        steps = [s["step"] for s in states]
        dtype = exp_avgs[0].dtype
        beta_t = torch.full((), beta, dtype=dtype, device=ok.device)
        torch._foreach_mul_(exp_avgs, torch.where(ok, beta_t, 1.0))
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta)
        torch._foreach_add_(steps, okf)
        # 1 − β^t in the parameters' precision (t ≥ 1: a skipped first step cannot divide by 0)
        exponents = [s.to(dtype) for s in torch._foreach_maximum(steps, 1.0)]
        corrections = torch._foreach_pow(beta, exponents)
        torch._foreach_neg_(corrections)
        torch._foreach_add_(corrections, 1.0)
        directions = precond.solve(params, torch._foreach_div(exp_avgs, corrections), self.power)
        if wd != 0 and self.decoupled_weight_decay:
            torch._foreach_add_(directions, params, alpha=wd)
        torch._foreach_mul_(directions, okf)
        torch._foreach_add_(params, directions, alpha=-lr)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decoupled_weight_decay={self.decoupled_weight_decay}, "
            f"power={self.power:g})"
        )


@register("updates", "adafisherw")
class AdaFisherWUpdate(AdaFisherUpdate):
    r"""AdaFisherW: ``θ ← θ − α (m̂ / F + κ θ)`` (decoupled weight decay)."""

    def __init__(self, decoupled_weight_decay: bool = True, power: float = 1.0) -> None:
        super().__init__(decoupled_weight_decay=decoupled_weight_decay, power=power)
