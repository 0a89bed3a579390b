"""nn.Linear on inputs of any rank: rows are all leading dimensions flattened."""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.registry import register


@register("adapters", "linear")
class LinearAdapter(LayerAdapter):
    r"""``z = W x + b``: ā = [x, 1] (1 only with a bias), g = ∂L/∂z, rows = every leading dim.

    ``H = Σ_rows ā² / R`` (bias entry = 1), ``S = Σ_rows g² / R``; ``F_W[o, i] = S[o] H[i]``,
    ``F_b[o] = S[o] H[-1]`` (SPEC §3, paper Sec. 3.3).
    """

    module_types = (nn.Linear,)

    def input_signature(self, module: nn.Module) -> Hashable:
        return ("linear", module.bias is not None)

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = x.numel() // x.shape[-1]
        total = square_sum(x.reshape(rows, -1), 0, dtype)
        if module.bias is not None:
            total = torch.cat([total, total.new_full((1,), rows)])
        return Statistic(total, rows)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = grad_output.numel() // grad_output.shape[-1]
        return Statistic(square_sum(grad_output.reshape(rows, -1), 0, dtype), rows)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if module.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows[None]

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])
