"""Block-diagonal Kronecker factors: a complete curvlab plugin in one file (docs/plugins.md).

Use it without touching curvlab::

    opt = curvlab.build_optimizer(
        model,
        "docs/examples/block_diagonal_adafisher.gin",
        plugins=["docs/examples/block_diagonal_estimator.py"],
    )
"""

from __future__ import annotations

import torch.nn.functional as F
from curvlab.plugins.estimators.full import KroneckerRowsEstimator
from torch import Tensor

from curvlab.registry import register
from curvlab.validation import check_positive_int


@register("estimators", "block_diagonal")
class BlockDiagonalEstimator(KroneckerRowsEstimator):
    r"""Keeps the diagonal ``k × k`` blocks of each Kronecker factor, zeros elsewhere::

        A[i, j] = (1/R) Σ_r ā_r[i] ā_r[j]   if ⌊i/k⌋ = ⌊j/k⌋,   else 0     (G likewise, from g)

    ``k = 1`` gives the diagonal factors (AdaFisher's), ``k ≥ d`` the full ones (K-FAC's). The
    last block is shorter when ``k`` does not divide ``d`` (the bias entry, if any, is the last
    index). Every block is a principal submatrix of a positive semi-definite matrix, so the
    factor stays positive semi-definite (a band, in contrast, need not).

    Stored as structure ``"full"`` — ``(groups, d, d)`` with zeros off the blocks — so the core's
    eigenbasis solve, spectral min-max and damping apply unchanged. Only the blocks are computed
    (``O(R·d·k)`` multiply-adds instead of ``O(R·d²)``). Layers whose adapter gives no rows
    (normalisation layers, embeddings) keep diagonal factors: the inherited ``layer_structure``.

    Args:
        block_size: k ≥ 1 (gin: ``estimators.block_diagonal.block_size``).
        per_sample: multiply output gradients by the batch size, as
            :class:`~curvlab.plugins.estimators.full.KroneckerRowsEstimator` documents.
    """

    structure = "full"

    def __init__(self, block_size: int = 16, per_sample: bool = False) -> None:
        super().__init__(per_sample=per_sample)
        self.block_size = check_positive_int("block_size", block_size)

    def second_moment(self, rows: Tensor) -> Tensor:
        """Σ_r of the blocks of r rᵀ for rows of shape (groups, R, d), as (groups, d, d)."""
        groups, n_rows, d = rows.shape
        k = min(self.block_size, d)
        n_blocks = -(-d // k)  # ceil(d / k)
        padded = F.pad(rows, (0, n_blocks * k - d))  # zero columns: zero rows/cols, cut below
        chunks = padded.reshape(groups, n_rows, n_blocks, k).transpose(1, 2)  # (g, blocks, R, k)
        blocks = chunks.transpose(-1, -2) @ chunks  # (g, blocks, k, k)
        dense = rows.new_zeros(groups, n_blocks, k, n_blocks, k)
        dense.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))  # block b → (b, b)
        return dense.reshape(groups, n_blocks * k, n_blocks * k)[:, :d, :d].contiguous()

    def __repr__(self) -> str:
        return f"BlockDiagonalEstimator(block_size={self.block_size}, per_sample={self.per_sample})"
