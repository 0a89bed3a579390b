"""Undo the buffer updates of a skipped step (BatchNorm running statistics, ...).

A step skipped on a non-finite value leaves parameters, momentum and factors untouched, but
the forward passes before it already changed the model's *buffers*: one NaN pixel puts NaN
into BatchNorm's running mean, and every later evaluation is NaN. :class:`BufferGuard` makes the
skipped batch leave no trace there either, without a host–device synchronisation:

* a forward pre-hook on the model snapshots the buffers of its modules in training mode at the
  first training forward after a step (one packed copy per device and dtype);
* ``step()`` calls :meth:`BufferGuard.restore` with its on-device finite flag; the snapshot
  buffers are blended back, ``torch.where(ok, now, before)``, in one packed pass per device and
  dtype (a few kernels per step; on CPU, where reading the flag costs nothing, an accepted step
  skips the blend). Every snapshot buffer is blended, changed or not: BatchNorm's kernels update
  the running statistics without bumping their version counters, so there is no cheap way to
  tell which buffers a forward changed.

Generic: any buffer updated in place by a forward is covered, whatever the layer type.
Limits: only forwards through the model passed to the optimizer are seen (a submodule called on
its own is not); a buffer *replaced* by a new tensor (not updated in place) is not restored; the
copy costs one pass over the training-mode buffers per step (small next to the parameters for
the usual models, whose buffers are normalisation statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.interfaces.update import known_flag


@dataclass
class _Entry:
    module: nn.Module
    name: str
    tensor: Tensor


class BufferGuard:
    """Snapshots ``model``'s buffers before each step's first training forward; restores
    them when the step is skipped (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._armed = True  # snapshot at the next training forward
        self._inert = False  # a pickled copy of a hooked model: do nothing
        #: (device, dtype) → (entries, packed copy of their values at snapshot time)
        self._snapshot: dict[tuple[torch.device, torch.dtype], tuple[list[_Entry], Tensor]] = {}
        self._handle = model.register_forward_pre_hook(self._before_forward)

    # a copied model's hooks keep pointing here and are ignored (the module is not ours); a
    # pickled one gets an inert guard, as the capture engine does
    def __deepcopy__(self, memo: dict) -> BufferGuard:
        return self

    def __getstate__(self) -> dict:
        return {"_model": self._model, "_armed": False, "_inert": True, "_snapshot": {}}

    def detach(self) -> None:
        self._handle.remove()
        self._snapshot = {}

    @torch.compiler.disable  # bookkeeping in Python: keep it out of a compiled graph
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if self._inert or not self._armed or module is not self._model or not module.training:
            return
        self._armed = False
        groups: dict[tuple[torch.device, torch.dtype], list[_Entry]] = {}
        for sub in module.modules():
            if not sub.training or not sub._buffers:
                continue
            for name, buf in sub._buffers.items():
                if buf is not None and not buf.is_complex():
                    entry = _Entry(sub, name, buf)
                    groups.setdefault((buf.device, buf.dtype), []).append(entry)
        with torch.no_grad():
            self._snapshot = {
                key: (entries, torch.cat([e.tensor.reshape(-1) for e in entries]))
                for key, entries in groups.items()
            }

    @torch.no_grad()
    def restore(self, ok: Tensor) -> None:
        """End of a step: where ``ok`` (0-dim bool, on device) is False, put back the buffers
        as they were at the snapshot; re-arm the snapshot for the next step."""
        snapshot, self._snapshot, self._armed = self._snapshot, {}, True
        if not snapshot or known_flag(ok) is True:  # read only where it is free (CPU)
            return
        for (device, _), (entries, before) in snapshot.items():
            sizes = [e.tensor.numel() for e in entries]
            olds = before.split(sizes)
            changed = [  # every buffer still in place (see the module docstring)
                (e, o) for e, o in zip(entries, olds) if e.module._buffers.get(e.name) is e.tensor
            ]
            if not changed:
                continue
            now = torch.cat([e.tensor.reshape(-1) for e, _ in changed])
            old = torch.cat([o for _, o in changed]) if len(changed) < len(entries) else before
            blended = torch.where(ok.to(device, non_blocking=True), now, old)
            parts = blended.split([e.tensor.numel() for e, _ in changed])
            torch._foreach_copy_(
                [e.tensor for e, _ in changed],
                [p.view(e.tensor.shape) for (e, _), p in zip(changed, parts)],
            )
