"""Backend: where raw factor statistics come from (curvlab's hooks, BackPACK, ASDL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from curvlab.interfaces.estimator import FactorEstimator
    from curvlab.layers import LayerRecord


class Backend(ABC):
    """Attaches to the optimizer's layers and feeds each :class:`~curvlab.layers.LayerRecord`
    with statistics through ``record.accumulate(input_stat, output_stat)`` while ``is_active()``.
    """

    @abstractmethod
    def attach(
        self,
        layers: Sequence[LayerRecord],
        estimator: FactorEstimator,
        is_active: Callable[[], bool],
        model: nn.Module | None = None,
    ) -> None:
        """Hook ``layers`` (``model`` is the whole network, for backends that run it)."""

    @abstractmethod
    def detach(self) -> None: ...

    def collect(self) -> None:
        """Called at the start of a curvature ``step()``, before the records are read: a backend
        that computes statistics after backward (BackPACK, ASDL) fills the records here.
        ``step()`` runs under ``torch.no_grad()``: re-enable grad here if the backend needs it."""
        return None  # the native hooks fill the records during backward

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
