"""Diagonal factors (AdaFisher, paper Prop. 3.3.2): H_D = mean ā², S_D = mean g²."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic
from curvlab.interfaces.estimator import FactorEstimator
from curvlab.registry import register


@register("estimators", "diagonal")
class DiagonalEstimator(FactorEstimator):
    r"""Diagonals of the Kronecker factors, ``H_D = diag(E[ā āᵀ])`` and ``S_D = diag(E[g gᵀ])``,
    as sums over rows with their counts; each adapter supplies its fast path (e.g. convolution
    window sums instead of an unfold of the batch)."""

    structure = "diagonal"

    def input_statistic(
        self,
        adapter: LayerAdapter,
        module: nn.Module,
        x: Tensor,
        output: Tensor,
        dtype: torch.dtype,
    ) -> Statistic:
        return adapter.input_diagonal(module, x, output, dtype)

    def output_statistic(
        self, adapter: LayerAdapter, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        return adapter.output_diagonal(module, grad_output, dtype)
