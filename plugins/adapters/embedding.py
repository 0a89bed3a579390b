"""nn.Embedding as a linear layer on one-hot inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.registry import register


@register("adapters", "embedding")
class EmbeddingAdapter(LayerAdapter):
    r"""``z = W[i]`` = ``Wᵀ onehot(i)``: ā = onehot(i) (no bias), g = ∂L/∂z, rows = tokens.

    ``H[v] = (#tokens equal to v) / R`` (onehot² = onehot), ``S[d] = Σ g_d² / R``;
    the weight is (V, D) = (in, out), so ``F_W[v, d] = H[v] S[d]``.
    """

    module_types = (nn.Embedding,)

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        # index_add_ into a fixed-size vector: bincount's output size depends on max(x), which
        # synchronises with the device
        idx = x.reshape(-1)
        counts = torch.zeros(module.num_embeddings, dtype=dtype, device=x.device)
        counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=dtype, device=x.device))
        return Statistic(counts, x.numel())

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = grad_output.numel() // grad_output.shape[-1]
        return Statistic(square_sum(grad_output.reshape(rows, -1), 0, dtype), rows)

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"weight": (H[:, None], S[None, :])}
