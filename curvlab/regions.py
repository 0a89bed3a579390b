"""Row regions of packed parameters (``LayerAdapter.regions``).

A Kronecker block may own a row range (a ``slice`` of dim 0) of a parameter that several blocks
share: attention's q, k, v are rows ``0:E``, ``E:2E``, ``2E:3E`` of ``in_proj_weight``. This
module holds the rules about such regions: the blocks of a module must cover every row exactly
once (checked when pairing), when a parameter counts as *shared* (diagonal curvature summed
over its layers, as for tied weights), and which packed parameters are not yet covered by
layers with factors (identity curvature until they are).
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from curvlab.layers import LayerRecord


def span(region: slice, rows: int) -> tuple[int, int]:
    """(start, stop) of ``region`` in a parameter of ``rows`` rows."""
    start, stop, _ = region.indices(rows)
    return start, stop


def rows_of(tensor: Tensor, region: slice | None) -> Tensor:
    """The rows of ``tensor`` in ``region`` (all of it for None): a view."""
    return tensor if region is None else tensor[region]


def _covers(spans: list[tuple[int, int]], rows: int) -> bool:
    covered = 0
    for start, stop in sorted(spans):
        if start > covered:
            break
        covered = max(covered, stop)
    return covered >= rows


def tiles(regions: list[slice | None], rows: int) -> bool:
    """Whether every entry is a region and the distinct regions cover ``rows`` exactly once
    (the blocks of a packed parameter, each possibly several times for a tied one)."""
    if any(r is None for r in regions):
        return False
    spans = sorted({span(r, rows) for r in regions})
    return (
        spans[0][0] == 0
        and spans[-1][1] == rows
        and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    )


def check_regions(
    adapter_name: str, module_name: str, records: list[LayerRecord], trainable: Container[int]
) -> None:
    """The blocks of one module must cover every row of each trainable parameter they split
    into regions, without overlap (uncovered rows would get neither curvature nor fallback)."""
    rows: dict[int, tuple[int, str, list[tuple[int, int]]]] = {}
    for record in records:
        for role, region in record.regions.items():
            p = record.params[role]
            if region.indices(p.shape[0])[2] != 1:
                raise ValueError(
                    f"{adapter_name}: region {region} of {role!r} must be contiguous rows"
                )
            rows.setdefault(id(p), (p.shape[0], role, []))[2].append(span(region, p.shape[0]))
    for key, (n, role, spans) in rows.items():
        if key not in trainable:
            continue
        spans = sorted(spans)
        overlap = any(a[1] > b[0] for a, b in zip(spans, spans[1:]))
        if overlap or not _covers(spans, n):
            raise ValueError(
                f"{adapter_name}: the blocks of {module_name or '<root>'!r} cover rows "
                f"{spans} of its {role!r} parameter of {n} rows; the blocks of a packed "
                f"parameter must cover every row exactly once"
            )


def shared_parameters(layers: list[LayerRecord]) -> set[int]:
    """Ids of the parameters that get the *diagonal* of their layers' factors, summed.

    A parameter is shared when several layers use overlapping rows of it (tied weights: a GPT
    head tied to the token embedding), or when the blocks that split it into row regions have
    different structures (one joint eigenbasis solve per block cannot cover it). Blocks of one
    packed parameter with disjoint regions and the same structure (attention's q, k, v rows of
    ``in_proj_weight``) are not shared: each is solved in its own eigenbasis.
    """
    uses: dict[int, list[tuple[tuple[int, int] | None, str]]] = {}
    for record in layers:
        for role, p in record.params.items():
            region = record.regions.get(role)
            rows = None if region is None else span(region, p.shape[0])
            uses.setdefault(id(p), []).append((rows, record.structure))
    shared = set()
    for key, entries in uses.items():
        if len(entries) == 1:
            continue
        spans = sorted(s for s, _ in entries if s is not None)
        disjoint = len(spans) == len(entries) and all(
            a[1] <= b[0] for a, b in zip(spans, spans[1:])
        )
        if not disjoint or len({structure for _, structure in entries}) > 1:
            shared.add(key)
    return shared


def uncovered_parameters(layers: list[LayerRecord], with_factors: Container[str]) -> set[int]:
    """Ids of the packed parameters (split into regions) whose rows the layers named in
    ``with_factors`` do not cover entirely (a block not captured yet)."""
    packed = {id(r.params[role]) for r in layers for role in r.regions}
    if not packed:  # the usual case: nothing to check
        return set()
    spans: dict[int, list[tuple[int, int]]] = {}
    rows: dict[int, int] = {}
    for record in layers:
        if record.name not in with_factors:
            continue
        for role, p in record.params.items():
            if id(p) in packed:
                region = record.regions.get(role)
                rows[id(p)] = n = p.shape[0]
                spans.setdefault(id(p), []).append((0, n) if region is None else span(region, n))
    # a packed parameter without any layer with factors is not preconditioned anyway
    return {key for key, s in spans.items() if not _covers(s, rows[key])}
