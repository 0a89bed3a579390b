r"""The eigenbasis solve: exact for every damping mode (docs/math.md, "Eigenbasis solve").

A refresh eigendecomposes the EMA factors, ``H = Q_H Λ_H Q_Hᵀ`` and ``S = Q_S Λ_S Q_Sᵀ``; each
step normalises the stored spectra (an affine normaliser keeps the eigenvectors) and solves::

    F^{-p} vec(V) = Q_S [(Q_Sᵀ V Q_H) ⊘ D] Q_Hᵀ,     D = (Λ'_S Λ'_Hᵀ + λ)^p, …

``(Q_S ⊗ Q_H)`` is orthogonal and diagonalises ``S' ⊗ H' + λI``, so no Kronecker matrix and
no explicit inverse is formed. Four products per layer and step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer
from curvlab.kronecker import (
    KroneckerOperator,
    KroneckerSolver,
    Packs,
    RefreshItem,
    batches,
    damped_diagonal,
    eigen_denominator,
)

EIGEN_KEYS = ("LH", "QH", "LS", "QS")


class EigenOperator(KroneckerOperator):
    """One layer's eigenpairs, normalised spectra and damping for this step."""

    def __init__(
        self,
        LH: Tensor,
        LS: Tensor,
        QH: Tensor,
        QS: Tensor,
        damping: float,
        mode: str,
        pack: tuple[Packs, int, int] | None = None,
    ) -> None:
        self.LH, self.LS, self.QH, self.QS = LH, LS, QH, QS
        self.damping, self.mode = damping, mode
        self.dtype = QH.dtype
        self.pack = pack

    def solve(self, matrix: Tensor, power: float) -> Tensor:
        rotated = self.QS.transpose(-1, -2) @ matrix @ self.QH
        denom = eigen_denominator(self.LS, self.LH, self.damping, self.mode, power)
        return self.QS @ (rotated / denom) @ self.QH.transpose(-1, -2)

    def factor_diagonals(self) -> tuple[Tensor, Tensor]:
        H = ((self.QH * self.QH) @ self.LH.unsqueeze(-1)).squeeze(-1)
        S = ((self.QS * self.QS) @ self.LS.unsqueeze(-1)).squeeze(-1)
        return H, S

    def damped_diagonal(self) -> Tensor:
        H, S = self.factor_diagonals()
        return damped_diagonal(S, H, self.damping, self.mode)

    def batch_key(self) -> object:
        return None if self.pack is None else (id(self.pack[0]), self.pack[1])

    @classmethod
    def solve_batch(
        cls, operators: list[KroneckerOperator], matrices: list[Tensor], power: float
    ) -> list[Tensor]:
        ops: list[EigenOperator] = operators  # type: ignore[assignment]
        packs, pack_id, _ = ops[0].pack  # type: ignore[misc]
        stacked, size = packs.stacked(pack_id)
        if [op.pack[2] for op in ops] != list(range(size)):  # type: ignore[index]
            return super().solve_batch(operators, matrices, power)  # not the whole pack
        QH, QS = stacked["QH"], stacked["QS"]
        V = torch.stack(matrices)
        denom = torch.stack(
            [eigen_denominator(op.LS, op.LH, op.damping, op.mode, power) for op in ops]
        )
        rotated = QS.transpose(-1, -2) @ V @ QH
        return list((QS @ (rotated / denom) @ QH.transpose(-1, -2)).unbind())


class EigenSolver(KroneckerSolver):
    """Eigendecompositions of the factors (``torch.linalg.eigh`` in the factors' dtype, one
    batched call per factor shape); the exact solve of every damping mode."""

    name = "eigen"
    state_keys = (*EIGEN_KEYS, "eigen_valid")

    def __init__(self) -> None:
        self.packs = Packs(EIGEN_KEYS)

    def refresh(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> None:
        for batch in batches(items):
            stacked = {}
            for key in ("H", "S"):
                values, vectors = torch.linalg.eigh(torch.stack([it.dense(key) for it in batch]))
                stacked["L" + key], stacked["Q" + key] = values, vectors
            self.packs.adopt(batch, stacked)
            for item in batch:
                # an eigenbasis of never-updated (zero) factors must not precondition:
                # identity until the next refresh after an accepted update
                item.state["eigen_valid"] = item.state["updated"].clone()

    def operators(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> list[KroneckerOperator]:
        self.packs.ensure(items)
        out: list[KroneckerOperator] = []
        for item in items:
            state = item.state
            valid = state["eigen_valid"]
            LH = torch.where(valid, normalizer(state["LH"], "spectrum"), 1.0)
            LS = torch.where(valid, normalizer(state["LS"], "spectrum"), 1.0)
            where = self.packs.find(item)
            pack = None if where is None else (self.packs, *where)
            out.append(EigenOperator(LH, LS, state["QH"], state["QS"], damping, mode, pack))
        return out
