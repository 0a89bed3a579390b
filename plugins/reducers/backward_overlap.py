r"""Curvature statistics all-reduced while the backward pass runs.

``TorchDistributedReducer(overlap_backward=True)`` attaches a :class:`BackwardOverlap` to the
optimizer's layers. The capture engine counts, per layer, the captured forwards whose output
gradient has not arrived yet (``LayerRecord.pending``) and calls ``LayerRecord.on_statistics``
after each one arrives. Layers finish in reverse order of the forward; once a layer has no
pending output in this backward its statistics are complete, it joins the open bucket, and a
bucket that reaches the cap is taken from the layers (``record.take()``) and its all-reduce
launched at once (``async_op=True``), while autograd goes on with the layers before it. At the
end of each backward (an autograd final callback) the open bucket and every layer that still
holds statistics (a layer whose other use the backward did not reach) are launched too, and the
pending counts restart from zero. ``step()`` waits for everything and adds, per layer, the
reduced sums of all backward passes since the last step.

Why per backward and then added: the all-reduce is a sum, so for backward passes
:math:`b = 1..B` (gradient accumulation) and ranks :math:`r`

.. math:: \sum_r \sum_b T_{r,b} = \sum_b \sum_r T_{r,b},

the same totals (and counts) as one reduction of the accumulated statistics at ``step()``, up to
the order of the floating-point additions. The bucket boundaries depend only on the order in
which layers complete and on their sizes, which are the same on every rank when every rank runs
the same model code (as DDP requires); the collectives go to a process group of their own, so
they never interleave with DDP's or FSDP's collectives of the same backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable

if TYPE_CHECKING:
    from curvlab.layers import LayerRecord
    from curvlab.plugins.reducers.torch_distributed import (
        PendingReduction,
        TorchDistributedReducer,
    )


#: the statistics' own process group per job (WORLD → a group of the same ranks), created once
_OVERLAP_GROUPS: dict[Any, Any] = {}


def overlap_group(group: Any) -> Any:
    """The group of ``overlap_backward``'s collectives: ``group`` itself when given, otherwise
    one ``new_group`` of all ranks (every process creates it when it builds its first such
    reducer, as new_group requires), shared by the reducers of this process group."""
    if group is not None:
        return group
    world = dist.group.WORLD
    own = _OVERLAP_GROUPS.get(world)
    if own is None:
        _OVERLAP_GROUPS.clear()  # a group of an earlier (destroyed) process group
        own = _OVERLAP_GROUPS[world] = dist.new_group()
    return own


def _nbytes(record: LayerRecord) -> int:
    return sum(t.numel() * t.element_size() for t in (record.input_total, record.output_total))


class BackwardOverlap:
    """Launches the statistics of completed layers during backward (see the module doc).

    Args:
        reducer: packs, launches and unpacks (:meth:`TorchDistributedReducer.launch`).
        group: the process group of these collectives.
        cap_bytes: a bucket is launched once its layers' statistics reach this many bytes.
    """

    def __init__(self, reducer: TorchDistributedReducer, group: Any, cap_bytes: float) -> None:
        self.reducer = reducer
        self.group = group
        self.cap_bytes = cap_bytes
        self.layers: list[LayerRecord] = []
        self._open: list[LayerRecord] = []  # complete in this backward, not launched yet
        self._open_ids: set[int] = set()
        self._open_bytes = 0
        self._in_flight: list[tuple[list[str], PendingReduction]] = []
        self._callback_queued = False
        #: launches (one collective per (device, dtype) each) made from inside a backward
        #: once a bucket was full, and at the end of a backward
        self.launched_in_backward = 0
        self.launched_at_end = 0

    # -- attach -----------------------------------------------------------------------------------
    def attach(self, layers: Sequence[LayerRecord]) -> None:
        self.detach()
        self.layers = list(layers)
        for record in self.layers:
            record.on_statistics = self._on_statistics
            record.pending = 0

    def detach(self) -> None:
        for record in self.layers:
            if record.on_statistics == self._on_statistics:
                record.on_statistics = None
        self.layers = []
        self.discard()

    def discard(self) -> None:
        """Forget what was launched (the collectives finish on their own)."""
        self._open.clear()
        self._open_ids.clear()
        self._open_bytes = 0
        self._in_flight.clear()
        self._callback_queued = False  # a backward that raised never ran its callback

    # -- during backward --------------------------------------------------------------------------
    def _on_statistics(self, record: LayerRecord) -> None:
        if not self._callback_queued:
            try:  # runs once this backward's graph is done (DDP's reducer does the same)
                Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            except RuntimeError:  # not inside a backward: step() launches what is left
                pass
        if record.pending > 0 or id(record) in self._open_ids:
            return  # more of this layer's outputs are waiting for their gradient
        self._open.append(record)
        self._open_ids.add(id(record))
        self._open_bytes += _nbytes(record)
        if self._open_bytes >= self.cap_bytes:
            self._launch_open()
            self.launched_in_backward += 1

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        # layers whose statistics arrived but whose other captured outputs got no gradient in
        # this backward: launched now, in the reverse layer order in which layers complete
        for record in reversed(self.layers):
            if record.has_statistics and id(record) not in self._open_ids:
                self._open.append(record)
                self._open_ids.add(id(record))
        if self._open:
            self._launch_open()
            self.launched_at_end += 1
        for record in self.layers:  # a forward whose output never gets a gradient is forgotten
            record.pending = 0

    def _launch_open(self) -> None:
        records = self._open
        self._open, self._open_ids, self._open_bytes = [], set(), 0
        totals: list[Tensor] = []
        counts: list[int] = []
        for record in records:
            for stat in record.take():
                totals.append(stat.total)
                counts.append(stat.count)
        pending = self.reducer.launch_for_overlap(totals, counts, self.group)
        self._in_flight.append(([record.name for record in records], pending))

    # -- in step() ---------------------------------------------------------------------------------
    def take(self) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per layer (in layer order): the sums over ranks and backward passes."""
        if self._open:  # statistics that arrived outside a backward pass
            self._launch_open()
            self.launched_at_end += 1
        sums: dict[str, tuple[Tensor, ...]] = {}
        for names, pending in self._in_flight:
            totals, counts, _ = pending.wait()
            for i, name in enumerate(names):
                stat = (totals[2 * i], totals[2 * i + 1], counts[2 * i], counts[2 * i + 1])
                previous = sums.get(name)
                sums[name] = (
                    stat if previous is None else tuple(a + b for a, b in zip(previous, stat))
                )
        self._in_flight.clear()
        self._callback_queued = False
        if not sums:
            return {}
        return {r.name: sums[r.name] for r in self.layers if r.name in sums}  # type: ignore[misc]
