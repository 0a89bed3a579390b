"""Backend: where raw factor statistics come from (curvlab's hooks, BackPACK, ASDL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

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
    ) -> None: ...

    @abstractmethod
    def detach(self) -> None: ...

    def collect(self) -> None:
        """Called at the start of a curvature ``step()``, before the records are read: a backend
        that computes statistics after backward (BackPACK, ASDL) fills the records here."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
