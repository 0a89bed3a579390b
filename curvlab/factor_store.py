"""Diagonal factors of every layer in one flat vector per (device, dtype).

Per layer and step, the EMA, the skip mask, the min-max normalisation and the "identity until
the first accepted update" guard are each a handful of tiny ops; over a model's 30-160 layers
they were about 1 000 op calls per step (measured on the GPT benchmark, more time than the
update itself). Packed, each is one op for the whole model: ``H`` and ``S`` of every diagonal
layer sit side by side in one vector, ``curvature_state[name]["H"]`` etc. are views into it,
and the normalised factors are written into a second vector whose views the preconditioner
reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer, Segments
from curvlab.transfer import to_device_async


@dataclass
class _Pack:
    """One (device, dtype): layers in order, their H/S entries side by side in ``ema``."""

    names: list[str]
    shapes: list[tuple[torch.Size, torch.Size]]  # (H shape, S shape) per layer
    ema: Tensor  # flat: H_0, S_0, H_1, S_1, ...
    updated: Tensor  # bool per layer: had an accepted update
    segments: Segments  # 2 per layer (H, S)
    layer_of_entry: Tensor  # long per entry
    ema_views: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    normalized: Tensor | None = None  # the factors the preconditioner reads (see factors())
    normalized_views: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    normalized_version: int = -1
    counts: dict[tuple, Tensor] = field(default_factory=dict)  # row counts per entry, by counts

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.segments.sizes

    def views(self, flat: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(H, S) of every layer as views of ``flat`` (laid out like ``ema``)."""
        parts = flat.split(self.sizes)
        return [
            (parts[2 * i].view(h), parts[2 * i + 1].view(s)) for i, (h, s) in enumerate(self.shapes)
        ]


class DiagonalFactorStore:
    """EMA state of the diagonal layers, updated and normalised for all layers at once.

    ``state`` is the optimizer's ``curvature_state``: for every layer here it holds views
    (``H``, ``S`` into the flat EMA, ``updated`` into the per-layer flag vector), so
    ``state_dict`` and tests read it as before. Layers are added when their first statistics
    arrive (the vector is re-packed then, which is rare).
    """

    def __init__(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.state = state
        self._packs: dict[tuple[torch.device, torch.dtype], _Pack] = {}
        self._pack_of: dict[str, tuple[torch.device, torch.dtype]] = {}
        self.version = 0  # bumped whenever the EMA changes
        self.layout_version = 0  # bumped whenever the packs are rebuilt

    def __contains__(self, name: str) -> bool:
        return name in self._pack_of

    # -- layout ------------------------------------------------------------------------------------
    def _repack(self, key: tuple[torch.device, torch.dtype], new: dict[str, tuple]) -> None:
        """Add layers ``new`` (name → (H, S, updated) initial tensors) to the pack ``key``."""
        old = self._packs.get(key)
        names, shapes, pieces, flags = [], [], [], []
        if old is not None:
            for name, (H, S) in zip(old.names, old.ema_views):
                names.append(name)
                shapes.append((H.shape, S.shape))
                pieces += [H.reshape(-1), S.reshape(-1)]
            flags.append(old.updated)
        for name, (H, S, updated) in new.items():
            names.append(name)
            shapes.append((H.shape, S.shape))
            pieces += [H.reshape(-1), S.reshape(-1)]
            flags.append(updated.reshape(1))
        device, dtype = key
        ema = torch.cat([p.to(device=device, dtype=dtype) for p in pieces])
        updated = torch.cat([f.to(device=device, dtype=torch.bool) for f in flags])
        segments = Segments.of(tuple(p.numel() for p in pieces), device)
        pack = _Pack(names, shapes, ema, updated, segments, segments.ids // 2)
        pack.ema_views = pack.views(ema)
        self._packs[key] = pack
        for i, (name, (H, S)) in enumerate(zip(names, pack.ema_views)):
            self._pack_of[name] = key
            self.state[name] = {"H": H, "S": S, "updated": updated[i]}
        self.version += 1
        self.layout_version += 1

    def adopt(self, names: list[str]) -> None:
        """Pack layers whose state was set directly (``load_state_dict``)."""
        self.layout_version += 1
        self._packs.clear()
        self._pack_of.clear()
        grouped: dict[tuple, dict[str, tuple]] = {}
        for name in names:
            st = self.state[name]
            key = (st["H"].device, st["H"].dtype)
            grouped.setdefault(key, {})[name] = (st["H"], st["S"], st["updated"])
        for key, new in grouped.items():
            self._repack(key, new)

    def storages(self) -> frozenset[int]:
        """Data pointers of the buffers whose views :meth:`factors` returns."""
        out = set()
        for pack in self._packs.values():
            out.add(pack.ema.untyped_storage().data_ptr())
            if pack.normalized is not None:
                out.add(pack.normalized.untyped_storage().data_ptr())
        return frozenset(out)

    # -- the EMA -----------------------------------------------------------------------------------
    def update(
        self,
        stats: dict[str, tuple[Tensor, Tensor, object, object]],
        ok: Tensor,
        blend: Callable[[Tensor, Tensor], Tensor],
        init_value: float,
        normalize_estimate: Normalizer | None,
    ) -> None:
        """Fold this step's totals/counts into the EMA of every layer in ``stats``.

        ``blend(ema, estimate)`` is the new EMA (applied where ``ok``); ``init_value`` starts
        a new layer's EMA; ``normalize_estimate`` (official EMA) normalises each estimate first.
        """
        missing: dict[tuple, dict[str, tuple]] = {}
        for name, (H_total, S_total, _, _) in stats.items():
            if name not in self._pack_of:
                key = (H_total.device, H_total.dtype)
                zero = torch.zeros((), dtype=torch.bool, device=H_total.device)
                missing.setdefault(key, {})[name] = (
                    torch.full_like(H_total, init_value),
                    torch.full_like(S_total, init_value),
                    zero,
                )
        for key, new in missing.items():
            self._repack(key, new)
        for pack in self._packs.values():
            present = [name in stats for name in pack.names]
            if not any(present):
                continue
            totals, counts = [], []
            for name, (H, S) in zip(pack.names, pack.ema_views):
                if name in stats:
                    H_total, S_total, H_count, S_count = stats[name]
                    totals += [H_total.reshape(-1), S_total.reshape(-1)]
                    counts += [H_count, S_count]
                else:  # not captured this step: any finite placeholder, masked out below
                    totals += [H.reshape(-1), S.reshape(-1)]
                    counts += [1, 1]
            estimate = torch.cat(totals) / self._count_entries(pack, counts)
            if normalize_estimate is not None:
                estimate = normalize_estimate.normalize_segments(estimate, pack.segments)
            if all(present):
                accept, accept_layers = ok, ok
            else:
                mask = to_device_async(torch.tensor(present), ok.device)
                accept_layers = ok & mask
                accept = accept_layers[pack.layer_of_entry]
            pack.ema.copy_(torch.where(accept, blend(pack.ema, estimate), pack.ema))
            pack.updated.logical_or_(accept_layers)
        self.version += 1

    def _count_entries(self, pack: _Pack, counts: list) -> Tensor:
        """The row count of every entry's factor; cached for the usual case of Python-int
        counts that repeat from step to step."""
        device, dtype = pack.ema.device, pack.ema.dtype
        if all(isinstance(c, int) for c in counts):
            key = tuple(counts)
            cached = pack.counts.get(key)
            if cached is None:
                if len(pack.counts) > 64:
                    pack.counts.clear()
                vector = torch.tensor(counts, dtype=torch.float64).to(dtype)
                cached = to_device_async(vector, device)[pack.segments.ids]
                pack.counts[key] = cached
            return cached
        vector = torch.stack(
            [
                c.to(dtype)
                if isinstance(c, Tensor)
                else torch.full((), c, dtype=dtype, device=device)
                for c in counts
            ]
        )
        return vector[pack.segments.ids]

    # -- what the preconditioner reads -------------------------------------------------------------
    def factors(
        self, normalizer: Normalizer | None, guard: bool
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """(H', S') per layer: normalised (``normalizer``; None: the EMA as it is) and, with
        ``guard``, 1 for layers without an accepted update yet.

        The tensors are views of buffers that keep their storage until the next re-pack
        (``layout_version``): they are refreshed in place, only when the EMA changed, so
        whatever is built from the views (the preconditioner's products) stays valid.
        """
        out = {}
        for pack in self._packs.values():
            if normalizer is None and not guard:
                views = pack.ema_views
            else:
                if pack.normalized is None:
                    pack.normalized = torch.empty_like(pack.ema)
                    pack.normalized_views = pack.views(pack.normalized)
                if pack.normalized_version != self.version:
                    x = pack.ema
                    if normalizer is not None:
                        x = normalizer.normalize_segments(x, pack.segments)
                    if guard:
                        x = torch.where(pack.updated[pack.layer_of_entry], x, 1.0)
                    pack.normalized.copy_(x)
                    pack.normalized_version = self.version
                views = pack.normalized_views
            out.update(zip(pack.names, views))
        return out
