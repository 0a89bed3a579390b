"""FactorEstimator: the structure of the raw factors (diagonal, banded, full)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic


class FactorEstimator(ABC):
    """Computes raw, un-normalised factor statistics of one structure from a layer's rows.

    Raw means: a sum over rows and its row count (:class:`Statistic`), so that ``total / count``
    is the mean over batch and positions that BackPACK / ASDL / curvlinops report.
    """

    #: "diagonal", "banded" or "full": which preconditioner the core builds from the factors
    structure: str = "diagonal"

    @abstractmethod
    def input_statistic(
        self, adapter: LayerAdapter, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        """Statistic of the layer input (the H / A factor), called in the forward hook."""

    @abstractmethod
    def output_statistic(
        self, adapter: LayerAdapter, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        """Statistic of the output gradient (the S / G factor), called in the tensor hook."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
