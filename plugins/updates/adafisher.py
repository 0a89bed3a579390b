"""AdaFisher and AdaFisherW updates (Algorithm 1 of the thesis)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.interfaces.update import GroupWork, Preconditioner, UpdateRule, known_flag
from curvlab.registry import register
from curvlab.validation import check_range


def masked_grads(
    grads: list[Tensor], params: list[Tensor], weight_decay: float, ok: Tensor
) -> list[Tensor]:
    """``g + κθ`` (κ = 0: just g), or zeros on a skipped step, so that neither NaNs nor the
    decay term reach the state when the step is skipped."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return [torch.where(ok, g, 0.0) for g in grads]


@register("updates", "adafisher")
class AdaFisherUpdate(UpdateRule):
    r"""Bias-corrected momentum preconditioned by the Fisher, no square root::

        g ← g + κ θ                      (coupled L2, unless decoupled)
        m ← β m + (1−β) g,   m̂ = m / (1 − β^t)
        θ ← θ − α (F^{-p} m̂ [+ κ θ if decoupled])

    ``p = power`` is 1 for AdaFisher and 0.5 for the square-root ablation (and Adam, with an
    elementwise squared-gradient curvature). ``t`` counts the parameter's accepted steps. A
    skipped step (``ok`` False) changes nothing. Param-group keys: ``lr`` (α), ``beta`` (β),
    ``weight_decay`` (κ).
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

    def update(self, work: list[GroupWork], precond: Preconditioner, ok: Tensor) -> None:
        if not work:
            return
        known = known_flag(ok)
        if known is False:
            return  # a skipped step changes nothing
        all_params, all_moments, all_divisors = [], [], []
        for group, params, grads, states in work:
            beta, lr, wd = group["beta"], group["lr"], group["weight_decay"]
            exp_avgs = [s["exp_avg"] for s in states]
            steps = [s["step"] for s in states]
            dtype = exp_avgs[0].dtype
            coupled = 0.0 if self.decoupled_weight_decay else wd
            if known:
                # m ← β m + (1−β)(g + κθ), nothing allocated
                torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta)
                if coupled:
                    torch._foreach_add_(exp_avgs, params, alpha=(1.0 - beta) * coupled)
                torch._foreach_add_(steps, 1.0)
            else:
                # on device: zeroed gradients and weight 0 on a skipped step keep m exactly
                weight = torch.where(
                    ok, torch.full((), 1.0 - beta, dtype=dtype, device=ok.device), 0.0
                )
                torch._foreach_lerp_(
                    exp_avgs, masked_grads(grads, params, 0.0, ok), [weight] * len(exp_avgs)
                )
                if coupled:
                    torch._foreach_add_(exp_avgs, torch._foreach_mul(params, weight * coupled))
                # alpha selects the Tensor overload: a 0-dim tensor alone would be read with .item()
                torch._foreach_add_(steps, ok.to(torch.float32), alpha=1.0)
            # θ −= α m̂ / F with m̂ = m / (1 − β^t): the bias correction and α travel as one
            # divisor per parameter, (1 − β^t) / α (t ≥ 1: a skipped first step cannot give 0);
            # inf on a skipped step, which leaves θ unchanged
            # at least fp32: in fp16, (1 − β^t)/α overflows for α < 1.5e-5, and with β = 0.999
            # bf16 rounds 1 − β^t to 0
            t = torch.stack(steps).to(torch.promote_types(dtype, torch.float32)).clamp_min(1.0)
            divisors = (1.0 - torch.pow(beta, t)) / lr if lr > 0 else torch.full_like(t, math.inf)
            if not known:
                divisors = torch.where(ok, divisors, math.inf)
            if wd != 0 and self.decoupled_weight_decay:
                decay = 1.0 - lr * wd if known else 1.0 - (lr * wd) * ok.to(t.dtype)
                torch._foreach_mul_(params, decay)
            all_params += params
            all_moments += exp_avgs
            all_divisors += divisors.unbind()
        precond.add_solved_(all_params, all_moments, -1.0, self.power, all_divisors)

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
