"""Reducer: sums raw factor statistics across data-parallel ranks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from curvlab.layers import LayerRecord


class Reducer(ABC):
    """Sums per-step statistic totals (and row counts) across ranks.

    Called once per curvature update with every layer's totals; an implementation should issue
    one coalesced collective (or one per bucket), never one per layer.
    """

    @abstractmethod
    def reduce(
        self, totals: list[Tensor], counts: list[int]
    ) -> tuple[list[Tensor], list[int | Tensor]]:
        """Cross-rank sums of the statistic ``totals`` and of their row ``counts``.

        Means are then ``total / count``, i.e. weighted by each rank's number of rows.
        """

    def all_finite(self, flag: Tensor) -> Tensor:
        """AND a per-rank finite flag (0-dim bool) across ranks, so every rank skips the same
        steps."""
        return flag

    def reduce_with_flag(
        self, totals: list[Tensor], counts: list[int], flag: Tensor
    ) -> tuple[list[Tensor], list[int | Tensor], Tensor]:
        """:meth:`reduce` and :meth:`all_finite` together; a distributed reducer sends both in
        one collective."""
        totals, counts = self.reduce(totals, counts)
        return totals, counts, self.all_finite(flag)

    # -- statistics reduced during the backward pass (optional) ----------------------------------
    def attach(self, layers: Sequence[LayerRecord]) -> None:
        """The optimizer's layers, after every (re-)pairing. A reducer that sums statistics
        while the backward pass runs listens to them here (``LayerRecord.on_statistics``) and
        takes their statistics as they complete; the default reduces everything in ``step()``."""
        return None

    def detach(self) -> None:
        """Stop listening to the layers of :meth:`attach` (``close()``; idempotent)."""
        return None

    def take_reduced(self) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per layer name, ``(H_total, S_total, H_count, S_count)`` summed over ranks and over
        the backward passes since the last call, for the statistics this reducer took from the
        layers during backward (waits for their collectives), in the units :meth:`reduce`
        returns (the optimizer still divides by a GradScaler's scale). Default: nothing."""
        return {}

    def discard_reduced(self) -> None:
        """Drop what was taken during backward (``zero_grad``: those gradients are discarded)."""
        return None

    def split_refresh(self, costs: list[float]) -> list[int] | None:
        """KAISA-style split of the banded/full refresh (eigendecompositions, inverses): the
        rank that computes each layer (``costs``: its relative cost), or None (every rank
        computes every layer; the default). With owners, the optimizer refreshes its own
        layers and calls :meth:`share` with the results."""
        return None

    @property
    def rank(self) -> int:
        """This process's rank among the reducer's ranks (0 for one process)."""
        return 0

    def share(
        self, tensors: list[Tensor | None], owners: list[int], device: torch.device
    ) -> list[Tensor]:
        """Tensor ``i``, computed on rank ``owners[i]`` (None elsewhere), on every rank."""
        if any(t is None for t in tensors):
            raise NotImplementedError(f"{type(self).__name__} does not share tensors across ranks")
        return list(tensors)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
