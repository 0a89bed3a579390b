"""FactorEstimator: the structure of the raw factors (diagonal, banded, full, elementwise)."""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic

if TYPE_CHECKING:
    from curvlab.kronecker import KroneckerSolver

#: structures the core knows how to precondition with
STRUCTURES = ("diagonal", "banded", "full", "elementwise")


class FactorEstimator(ABC):  # noqa: B024 - every method has a default; none is required
    """Computes raw, un-normalised factor statistics of one structure.

    Raw means: a sum over rows and its row count (:class:`Statistic`), so that ``total / count``
    is the mean over batch and positions that BackPACK / ASDL / curvlinops report.

    Kronecker estimators (``diagonal``, ``banded``, ``full``) implement :meth:`input_statistic`
    and :meth:`output_statistic`, called from the capture hooks; per layer they may choose a
    simpler structure (:meth:`layer_structure`, e.g. diagonal for layers without rows).
    Storage per structure: ``diagonal`` a vector (``(groups, d)`` for grouped convolutions);
    ``full`` ``(groups, d, d)``; ``banded`` ``(groups, b+1, d)`` with row k holding
    ``M[i, i+k]`` (zero-padded at the end).

    ``elementwise`` estimators (one curvature entry per parameter entry, e.g. Adam's squared
    gradient) implement :meth:`gradient_statistic` instead and need no hooks.
    """

    #: the estimator's structure, one of :data:`STRUCTURES`
    structure: str = "diagonal"

    def layer_structure(self, adapter: LayerAdapter) -> str:
        """The structure used for layers of this adapter (default: :attr:`structure`)."""
        return self.structure

    def kronecker_solver(self, damping_mode: str) -> KroneckerSolver:
        """How banded/full layers are solved (default: inverses of the damped factors for
        ``factored`` damping, the exact eigenbasis solve otherwise; :mod:`curvlab.kronecker`)."""
        from curvlab.kronecker import default_solver  # (it imports the interfaces)

        return default_solver(damping_mode)

    def input_statistic(
        self,
        adapter: LayerAdapter,
        module: nn.Module,
        x: Tensor,
        output: Tensor,
        dtype: torch.dtype,
    ) -> Statistic:
        """Statistic of the layer input (the H / A factor), called in the forward hook."""
        raise NotImplementedError(f"{type(self).__name__} has no input statistic")

    def output_statistic(
        self, adapter: LayerAdapter, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        """Statistic of the output gradient (the S / G factor), called in the tensor hook."""
        raise NotImplementedError(f"{type(self).__name__} has no output statistic")

    def gradient_statistic(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """``elementwise`` estimators: this step's curvature estimate from the gradient."""
        raise NotImplementedError(f"{type(self).__name__} is not an elementwise estimator")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
