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
    matmul,
    pad_matrices,
    symmetric_eigh,
)

EIGEN_KEYS = ("LH", "QH", "LS", "QS")


class EigenOperator(KroneckerOperator):
    """One layer's eigenpairs, normalised spectra and damping for this step."""

    def __init__(
        self,
        LH: Tensor,
        LS: Tensor,
        state: dict[str, Tensor],
        damping: float,
        mode: str,
        packs: Packs,
        where: tuple[int, int],
    ) -> None:
        self.LH, self.LS, self.QH, self.QS = LH, LS, state["QH"], state["QS"]
        self.damping, self.mode = damping, mode
        self.dtype = self.QH.dtype
        self.packs, (self.pack_id, self.pos) = packs, where

    def solve(self, matrix: Tensor, power: float) -> Tensor:
        return self.solve_batch([self], [matrix], power)[0]

    def factor_diagonals(self) -> tuple[Tensor, Tensor]:
        H = ((self.QH * self.QH) @ self.LH.unsqueeze(-1)).squeeze(-1)
        S = ((self.QS * self.QS) @ self.LS.unsqueeze(-1)).squeeze(-1)
        return H, S

    def damped_diagonal(self) -> Tensor:
        H, S = self.factor_diagonals()
        return damped_diagonal(S, H, self.damping, self.mode)

    def batch_key(self) -> object:
        return (id(self.packs), self.pack_id)

    @classmethod
    def solve_batch(
        cls, operators: list[KroneckerOperator], matrices: list[Tensor], power: float
    ) -> list[Tensor]:
        """``Q_S [(Q_Sᵀ V Q_H) ⊘ D] Q_Hᵀ`` with the packed (zero-padded) eigenvectors; ``D``
        is padded with ones (the padded block of the rotated matrix is zero)."""
        ops: list[EigenOperator] = operators  # type: ignore[assignment]
        stacked, size = ops[0].packs.stacked(ops[0].pack_id)
        positions = [op.pos for op in ops]
        if len(ops) > 1 and positions != list(range(size)):  # not the whole pack
            return [op.solve(m, power) for op, m in zip(ops, matrices)]
        QH, QS = stacked["QH"], stacked["QS"]
        if len(ops) == 1:
            QH, QS = QH[positions[0]], QS[positions[0]]
        rows, cols = QS.shape[-1], QH.shape[-1]
        denoms = [eigen_denominator(op.LS, op.LH, op.damping, op.mode, power) for op in ops]
        V = pad_matrices(matrices, rows, cols)
        D = pad_matrices(denoms, rows, cols, value=1.0)
        if len(ops) == 1:
            V, D = V[0], D[0]
        rotated = matmul(matmul(QS.transpose(-1, -2), V), QH)
        out, d = matrices[0].shape[-2:]
        solved = matmul(matmul(QS, rotated / D), QH.transpose(-1, -2))[..., :out, :d]
        return [solved] if len(ops) == 1 else list(solved.unbind())


class EigenSolver(KroneckerSolver):
    """Eigendecompositions of the factors (in the factors' dtype, float64 where that fails:
    :func:`~curvlab.kronecker.symmetric_eigh`; one batched call per factor shape); the exact
    solve of every damping mode."""

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
                values, vectors = symmetric_eigh(torch.stack([it.dense(key) for it in batch]))
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
            assert where is not None  # ensure() packed every item
            out.append(EigenOperator(LH, LS, state, damping, mode, self.packs, where))
        return out
