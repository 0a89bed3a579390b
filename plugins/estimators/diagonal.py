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
    window sums instead of an unfold of the batch).

    ``per_sample=False`` (the paper's and the official code's convention): g is the gradient of
    the loss as backpropagated, so for a mean-reduced loss S carries 1/N² and can fall far below
    min-max's ε = 1e-6 (docs/math.md). ``per_sample=True`` multiplies each call's g by its batch
    size (per-sample gradients, the K-FAC convention), an ablation axis for that effect.
    """

    structure = "diagonal"

    def __init__(self, per_sample: bool = False) -> None:
        self.per_sample = bool(per_sample)

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
        stat = adapter.output_diagonal(module, grad_output, dtype)
        if self.per_sample:
            n = adapter.batch_size(module, grad_output)
            return Statistic(stat.total * float(n) ** 2, stat.count)
        return stat

    def __repr__(self) -> str:
        return f"{type(self).__name__}(per_sample={self.per_sample})"
