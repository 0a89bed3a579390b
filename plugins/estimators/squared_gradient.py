"""Elementwise squared gradient (Adam's second moment) as a curvature estimator."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from curvlab.interfaces.estimator import FactorEstimator
from curvlab.registry import register


@register("estimators", "squared_gradient")
class SquaredGradientEstimator(FactorEstimator):
    r"""``F̂ = (g + κθ)²`` per entry (κ = the group's coupled weight decay when
    ``include_weight_decay``, as ``torch.optim.Adam`` squares the decayed gradient).

    With the EMA γ = β₂ and its bias correction, square root and ε after the root
    (``configs/adam.gin``), the pipeline is Adam."""

    structure = "elementwise"

    def __init__(self, include_weight_decay: bool = True) -> None:
        self.include_weight_decay = bool(include_weight_decay)

    def gradient_statistic(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        wd = group.get("weight_decay", 0.0)
        if self.include_weight_decay and wd != 0:
            grad = grad + wd * param
        return grad * grad
