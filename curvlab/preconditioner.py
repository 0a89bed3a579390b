"""Diagonal preconditioner: F per parameter from the layers' (normalised) factors, never as a
Kronecker matrix: ``F = S'[:, None] * H'[None, :] + λ`` (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.interfaces.update import Preconditioner
from curvlab.layers import LayerRecord


class DiagonalPreconditioner(Preconditioner):
    """``F(p) = Σ_{layers using p} curvature_layer(p) + λ``; identity (``1 + λ`` or ``1``) for
    parameters without captured curvature.

    ``factors(record)`` returns the layer's (H', S') ready for the product (normalised), or None
    when the layer has no statistics yet.
    """

    def __init__(
        self,
        layers: list[LayerRecord],
        factors: Callable[[LayerRecord], tuple[Tensor, Tensor] | None],
        damping: float,
        fallback_value: float,
    ) -> None:
        self._layers = layers
        self._factors = factors
        self.damping = damping
        self.fallback_value = fallback_value
        self._curvature: dict[int, Tensor] | None = None

    def _compute(self) -> dict[int, Tensor]:
        if self._curvature is None:
            curvature: dict[int, Tensor] = {}
            for record in self._layers:
                factors = self._factors(record)
                if factors is None:
                    continue
                H, S = factors
                for role, value in record.adapter.curvature(record.module, H, S).items():
                    key = id(record.params[role])
                    curvature[key] = value if key not in curvature else curvature[key] + value
            for key, value in curvature.items():
                curvature[key] = value + self.damping
            self._curvature = curvature
        return self._curvature

    def dense_diagonal(self, param: Tensor) -> Tensor:
        F = self._compute().get(id(param))
        if F is None:
            return torch.full_like(param, self.fallback_value, dtype=torch.promote_types(param.dtype, torch.float32))
        return F

    def solve(self, params: list[Tensor], tensors: list[Tensor], power: float = 1.0) -> list[Tensor]:
        curvature = self._compute()
        out: list[Tensor | None] = [None] * len(params)
        pre_idx = [i for i, p in enumerate(params) if id(p) in curvature]
        fb_idx = [i for i, p in enumerate(params) if id(p) not in curvature]
        if pre_idx:
            Fs = [curvature[id(params[i])] for i in pre_idx]
            if power != 1.0:
                Fs = torch._foreach_pow(Fs, power)
            solved = torch._foreach_div([tensors[i] for i in pre_idx], Fs)
            for i, s in zip(pre_idx, solved):
                out[i] = s
        if fb_idx:
            scale = self.fallback_value**power
            solved = torch._foreach_div([tensors[i] for i in fb_idx], scale)
            for i, s in zip(fb_idx, solved):
                out[i] = s
        return out  # type: ignore[return-value]
