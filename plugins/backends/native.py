"""curvlab's own hooks (the fast default backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from curvlab.capture import CaptureEngine
from curvlab.interfaces.backend import Backend
from curvlab.interfaces.estimator import FactorEstimator
from curvlab.layers import LayerRecord
from curvlab.registry import register


@register("backends", "native")
class NativeBackend(Backend):
    """Forward hooks + output tensor hooks (:class:`curvlab.capture.CaptureEngine`)."""

    def __init__(self) -> None:
        self.engine = CaptureEngine()

    def attach(
        self,
        layers: Sequence[LayerRecord],
        estimator: FactorEstimator,
        is_active: Callable[[], bool],
        model: nn.Module | None = None,
    ) -> None:
        self.engine.attach(layers, estimator, is_active)

    def detach(self) -> None:
        self.engine.detach()
