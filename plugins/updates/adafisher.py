"""AdaFisher and AdaFisherW updates (Algorithm 1 of the thesis)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.interfaces.update import GroupWork, Preconditioner, UpdateRule
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
        okf = ok.to(torch.float32)
        all_params, all_moments, all_coefs = [], [], []
        for group, params, grads, states in work:
            beta, wd = group["beta"], group["weight_decay"]
            grads = masked_grads(grads, params, 0.0 if self.decoupled_weight_decay else wd, ok)
            exp_avgs = [s["exp_avg"] for s in states]
            steps = [s["step"] for s in states]
            dtype = exp_avgs[0].dtype
            beta_t = torch.full((), beta, dtype=dtype, device=ok.device)
            # a skipped step keeps β = 1 and adds zero: m and t stay as they are
            torch._foreach_mul_(exp_avgs, torch.where(ok, beta_t, 1.0))
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta)
            torch._foreach_add_(steps, okf, alpha=1.0)  # the Tensor overload: no .item()
            # okf / (1 − β^t) for every parameter at once, in the parameters' precision
            # (t ≥ 1: a skipped first step cannot divide by 0); F^{-p} is linear, so the bias
            # correction can be applied after the solve
            t = torch.stack(steps).to(dtype).clamp_min(1.0)
            coefs = (okf.to(dtype) / (1.0 - torch.pow(beta_t, t))).unbind()
            all_params += params
            all_moments += exp_avgs
            all_coefs += coefs
        directions = precond.solve(all_params, all_moments, self.power)
        torch._foreach_mul_(directions, all_coefs)
        start = 0
        for group, params, _, _ in work:
            lr, wd = group["lr"], group["weight_decay"]
            step_dirs = directions[start : start + len(params)]
            start += len(params)
            if wd != 0 and self.decoupled_weight_decay:
                decay = ok.to(params[0].dtype) * wd  # κ, or 0 on a skipped step
                torch._foreach_add_(step_dirs, torch._foreach_mul(params, decay))
            torch._foreach_add_(params, step_dirs, alpha=-lr)

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
