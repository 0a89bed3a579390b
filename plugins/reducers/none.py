"""Single-process reducer."""

from __future__ import annotations

from torch import Tensor

from curvlab.interfaces.reducer import Reducer
from curvlab.registry import register


@register("reducers", "none")
class NoReducer(Reducer):
    """One process: statistics are already global."""

    def reduce(self, totals: list[Tensor], counts: list[int]) -> tuple[list[Tensor], list[int]]:
        return totals, counts
