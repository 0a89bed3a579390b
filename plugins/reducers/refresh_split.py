"""KAISA's split of the inverse work: each layer's refresh on one rank, the results shared.

Pauloski et al. (KAISA, SC 2021) compute each layer's factor eigendecomposition or inverse on
one worker and broadcast it, instead of every worker computing every layer. Here a refresh
(:meth:`curvlab.kronecker.KroneckerSolver.refresh`) of a layer costs about ``Σ groups · d³``
over its two factors; :func:`assign_owners` gives every layer to a rank, largest first to the
least-loaded rank (the longest-processing-time rule), and :func:`share` sends each rank's
results to the others: the shapes in one ``all_gather_object``, then per owner rank and dtype
one ``broadcast`` of the concatenated tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def assign_owners(costs: list[float], world: int) -> list[int]:
    """The rank that computes each item: the most expensive first, to the least-loaded rank
    (ties: the lower index, the lower rank), identical on every rank."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def share(
    tensors: list[Tensor | None], owners: list[int], group: Any, device: torch.device
) -> list[Tensor]:
    """Tensor ``i`` computed on rank ``owners[i]`` (``None`` on the other ranks), on every rank.

    Collectives: one ``all_gather_object`` (shapes and dtypes) and one ``broadcast`` per
    owner rank and dtype. Booleans travel as ``uint8``.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    meta = {i: (tuple(t.shape), t.dtype) for i, t in enumerate(tensors) if owners[i] == rank}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, meta, group=group)
    out = list(tensors)
    for src in range(world):
        by_dtype: dict[torch.dtype, list[tuple[int, tuple[int, ...]]]] = {}
        for i, (shape, dtype) in sorted(gathered[src].items()):
            by_dtype.setdefault(dtype, []).append((i, shape))
        for dtype, entries in by_dtype.items():
            wire = torch.uint8 if dtype == torch.bool else dtype
            if src == rank:
                buffer = torch.cat([tensors[i].reshape(-1).to(wire) for i, _ in entries])
            else:
                numel = sum(math.prod(shape) for _, shape in entries)
                buffer = torch.empty(numel, dtype=wire, device=device)
            root = src if group is None else dist.get_global_rank(group, src)
            dist.broadcast(buffer, src=root, group=group)
            if src == rank:
                continue
            start = 0
            for i, shape in entries:
                n = math.prod(shape)
                out[i] = buffer[start : start + n].view(shape).to(dtype).clone()
                start += n
    return out  # type: ignore[return-value]
