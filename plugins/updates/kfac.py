"""K-FAC natural-gradient update with momentum and optional KL clipping."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.interfaces.update import GroupWork, Preconditioner, UpdateRule
from curvlab.plugins.updates.adafisher import masked_grads
from curvlab.registry import register


@register("updates", "kfac")
class KFACUpdate(UpdateRule):
    r"""Natural gradient ``d = F^{-1}(g + κθ)`` (F = the damped Kronecker curvature), then::

        ν = min(1, sqrt(c / (α² Σ d·(g + κθ))))     (KL clipping, when ``kl_clip = c`` is set)
        m ← β m + ν d,    θ ← θ − α m

    (Martens & Grosse 2015; Ba et al. 2017 for the KL clip). ν is computed on device (no host
    synchronisation). Param-group keys: ``lr`` (α), ``beta`` (momentum β), ``weight_decay`` (κ).
    """

    hyperparameters: dict[str, Any] = {}

    def __init__(self, kl_clip: float | None = None) -> None:
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip!r}")
        self.kl_clip = kl_clip

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"momentum": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, work: list[GroupWork], precond: Preconditioner, ok: Tensor) -> None:
        if not work:
            return
        okf = ok.to(torch.float32)
        all_params, all_grads = [], []
        for group, params, grads, _ in work:
            grads = masked_grads(grads, params, group["weight_decay"], ok)
            all_params += params
            all_grads += grads
        directions = precond.solve(all_params, all_grads)
        if self.kl_clip is not None:
            lr = work[0][0]["lr"]
            # in fp64: d·g of huge (finite) fp32 gradients must not overflow into a NaN ν
            vg = torch.stack(
                [(d.double() * g.double()).sum() for d, g in zip(directions, all_grads)]
            ).sum()
            nu = torch.sqrt(self.kl_clip / (lr**2 * vg.clamp_min(1e-30))).clamp(max=1.0)
            nu = torch.nan_to_num(nu, nan=0.0).to(directions[0].dtype)
            torch._foreach_mul_(directions, nu)
        start = 0
        for group, params, _, states in work:
            moms = [s["momentum"] for s in states]
            step_dirs = directions[start : start + len(params)]
            start += len(params)
            beta_t = torch.full((), group["beta"], dtype=moms[0].dtype, device=ok.device)
            torch._foreach_mul_(moms, torch.where(ok, beta_t, 1.0))
            torch._foreach_mul_(step_dirs, okf)
            torch._foreach_add_(moms, step_dirs)
            torch._foreach_add_(params, torch._foreach_mul(moms, okf), alpha=-group["lr"])

    def __repr__(self) -> str:
        return f"KFACUpdate(kl_clip={self.kl_clip})"
