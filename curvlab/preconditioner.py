"""The preconditioner of one step, built from every layer's normalised factors.

Diagonal layers never form a Kronecker matrix: ``F = S'[:, None] * H'[None, :] + λ`` (SPEC §3).
Banded and full layers are solved in the factors' eigenbases, exact for Kronecker + λI::

    (Q_S ⊗ Q_H)(Λ_S ⊗ Λ_H + λ)^{-p}(Q_S ⊗ Q_H)ᵀ vec(V)
        = Q_S [(Q_Sᵀ V Q_H) / (Λ_S Λ_Hᵀ + λ)^p] Q_Hᵀ
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.interfaces.update import Preconditioner
from curvlab.layers import LayerRecord


@dataclass
class LayerFactors:
    """Normalised factors of one layer: entries (diagonal) or eigenpairs (banded / full)."""

    structure: str  # "diagonal" or "eigen"
    H: Tensor  # diagonal entries, or eigenvalues (groups, d)
    S: Tensor
    QH: Tensor | None = None  # eigenvectors (groups, d, d)
    QS: Tensor | None = None


def split_pi(H: Tensor, S: Tensor) -> Tensor:
    """π = sqrt((tr H / dim H) / (tr S / dim S)) of the factored damping (Martens & Grosse)."""
    tiny = torch.finfo(H.dtype).tiny
    return torch.sqrt(H.mean().clamp_min(tiny) / S.mean().clamp_min(tiny))


class CurvaturePreconditioner(Preconditioner):
    """``F`` of every optimized parameter for the current step.

    Sources, in order: an elementwise curvature (``elementwise`` estimators), the layers'
    factors (diagonal: summed over every layer that uses the parameter; banded/full: one joint
    solve of weight and bias per layer), identity (``fallback_value``) for the rest. A parameter
    shared by several layers uses the diagonals of their factors (summed), whatever the
    structure.
    """

    def __init__(
        self,
        layers: list[LayerRecord],
        layer_factors: dict[str, LayerFactors],
        elementwise: dict[int, Tensor],
        damping: float,
        mode: str,
        fallback_value: float,
        shared: set[int],
    ) -> None:
        self.damping = damping
        self.mode = mode
        self.fallback_value = fallback_value
        self.elementwise = elementwise
        self.diagonal: dict[int, Tensor] = {}  # undamped (or factored-damped) curvature
        self.joint: list[tuple[LayerRecord, LayerFactors]] = []
        for record in layers:
            factors = layer_factors.get(record.name)
            if factors is None:
                continue
            uses_shared = any(id(p) in shared for p in record.params.values())
            if factors.structure == "eigen" and not uses_shared:
                self.joint.append((record, factors))
                continue
            H, S = (
                (factors.H, factors.S)
                if factors.structure == "diagonal"
                else self._diag_of(factors)
            )
            if mode == "factored":
                pi = split_pi(H, S)
                root = math.sqrt(damping)
                H, S = H + pi * root, S + root / pi
            for role, value in record.adapter.curvature(record.module, H, S).items():
                key = id(record.params[role])
                self.diagonal[key] = (
                    value if key not in self.diagonal else self.diagonal[key] + value
                )

    @staticmethod
    def _diag_of(factors: LayerFactors) -> tuple[Tensor, Tensor]:
        """Diagonals of Q diag(Λ) Qᵀ, shaped like diagonal factors ((groups, d) → squeeze)."""
        H = ((factors.QH * factors.QH) @ factors.H.unsqueeze(-1)).squeeze(-1)
        S = ((factors.QS * factors.QS) @ factors.S.unsqueeze(-1)).squeeze(-1)
        return (H[0] if H.shape[0] == 1 else H), S.reshape(-1)

    # -- damping of diagonal curvature ---------------------------------------------------------
    def _denominator(self, F: Tensor, power: float) -> Tensor:
        """What the update divides by: (F + λ)^p, F^p + λ, or (factored, already damped) F^p."""
        if self.mode == "after_product":
            F = F + self.damping
            return F if power == 1.0 else F.pow(power)
        if self.mode == "after_root":
            return (F if power == 1.0 else F.pow(power)) + self.damping
        return F if power == 1.0 else F.pow(power)

    def _fallback_denominator(self, power: float) -> float:
        return self.fallback_value**power

    # -- Preconditioner API --------------------------------------------------------------------
    def solve(
        self, params: list[Tensor], tensors: list[Tensor], power: float = 1.0
    ) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(params)
        index = {id(p): i for i, p in enumerate(params)}
        for record, factors in self.joint:
            roles = {r: index[id(p)] for r, p in record.params.items() if id(p) in index}
            if not roles:
                continue
            adapter, module = record.adapter, record.module
            matrix = adapter.to_matrix(module, {r: tensors[i] for r, i in roles.items()})
            solved = self._eigen_solve(matrix.to(factors.H.dtype), factors, power)
            pieces = adapter.from_matrix(module, solved)
            for role, i in roles.items():
                out[i] = pieces[role].to(tensors[i].dtype)
        diag_idx, diag_F = [], []
        for i, p in enumerate(params):
            if out[i] is not None:
                continue
            F = self.elementwise.get(id(p))
            if F is None:
                F = self.diagonal.get(id(p))
            if F is not None:
                diag_idx.append(i)
                diag_F.append(self._denominator(F, power))
        if diag_idx:
            solved = torch._foreach_div([tensors[i] for i in diag_idx], diag_F)
            for i, s in zip(diag_idx, solved):
                out[i] = s
        rest = [i for i in range(len(params)) if out[i] is None]
        if rest:
            solved = torch._foreach_div(
                [tensors[i] for i in rest], self._fallback_denominator(power)
            )
            for i, s in zip(rest, solved):
                out[i] = s
        return out  # type: ignore[return-value]

    def _eigen_solve(self, matrix: Tensor, f: LayerFactors, power: float) -> Tensor:
        rotated = f.QS.transpose(-1, -2) @ matrix @ f.QH
        LS, LH = f.S.unsqueeze(-1), f.H.unsqueeze(-2)
        if self.mode == "factored":
            pi = split_pi(f.H, f.S)
            root = math.sqrt(self.damping)
            denom = (LS + root / pi) * (LH + pi * root)
            denom = denom if power == 1.0 else denom.pow(power)
        elif self.mode == "after_root":
            denom = LS * LH
            denom = (denom if power == 1.0 else denom.clamp_min(0).pow(power)) + self.damping
        else:
            denom = LS * LH + self.damping
            denom = denom if power == 1.0 else denom.pow(power)
        return f.QS @ (rotated / denom) @ f.QH.transpose(-1, -2)

    def dense_diagonal(self, param: Tensor) -> Tensor:
        """diag(F), damping included, such that the update divides by ``F^p`` — except with
        ``after_root`` damping, where the update divides by ``F^p + λ`` and this returns F."""
        F = self.elementwise.get(id(param))
        if F is None:
            F = self.diagonal.get(id(param))
        if F is None:
            for record, factors in self.joint:
                for role, p in record.params.items():
                    if p is param:
                        return self._joint_diagonal(record, factors)[role]
            return torch.full_like(
                param, self.fallback_value, dtype=torch.promote_types(param.dtype, torch.float32)
            )
        if self.mode == "after_product":
            return F + self.damping
        return F

    def _joint_diagonal(self, record: LayerRecord, factors: LayerFactors) -> dict[str, Tensor]:
        H = ((factors.QH * factors.QH) @ factors.H.unsqueeze(-1)).squeeze(-1)  # (groups, d)
        S = ((factors.QS * factors.QS) @ factors.S.unsqueeze(-1)).squeeze(-1)  # (groups, o)
        if self.mode == "factored":
            pi = split_pi(factors.H, factors.S)
            root = math.sqrt(self.damping)
            F = (S + root / pi).unsqueeze(-1) * (H + pi * root).unsqueeze(-2)
        else:
            F = S.unsqueeze(-1) * H.unsqueeze(-2) + self.damping
        return record.adapter.from_matrix(record.module, F)
