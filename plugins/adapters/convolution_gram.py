r"""K-FAC's input factor of a stride-1 convolution without unfolding it: ``Σ ā āᵀ`` from
shifted correlations of the input.

For a convolution with stride 1 (any spatial rank, dilation d, zero padding, one group) the
patch entry for channel c, kernel offset u and output position t is ``x[c, t + u·d − p]``
(``p`` the padding before, ``x`` zero outside the image). The block of ``A = Σ_{n,t} ā āᵀ``
for offsets (u, v) is therefore a correlation of the input with itself at the shift
``δ = (v − u)·d``, summed over the window ``W_u = {t + u·d − p}`` of positions::

    A_uv[c, c'] = Σ_n Σ_{z ∈ W_u} x[c, z] x[c', z + δ]
                = T_δ[c, c'] − Σ_n Σ_{z ∈ J_δ \ W_u} x[c, z] x[c', z + δ]

``T_δ = Σ_n Σ_{z ∈ J_δ} x[c, z] x[c', z + δ]`` is the full correlation (``J_δ``: the z with z
and z + δ both in the image), one GEMM for all offset pairs of that shift; ``T_{−δ} = T_δᵀ``,
so a k×k kernel needs ``((2k−1)² + 1)/2`` of them (13 for 3×3) instead of the unfold's
``(9C)²`` entries per row. ``J_δ \ W_u`` is a union of border strips (one box per axis and
side, disjoint), each a small GEMM. With a bias, the last column is the window sums of x and
the corner the row count.

``T_δ`` is a single product of two row ranges of the input in channels-last layout, flattened
with ``(k − 1)·d`` zeros after each axis: a shift of the flattened rows by ``δ``'s flat offset
pairs every image position with its neighbour at δ, and the zeros absorb the wrap at an axis'
end (no copy per shift).

Measured (2 threads, fp32, ResNet-18 at batch 16, unfold + :func:`gram` → this): 64 channels
at 32×32 182 → 43 ms, 128 at 16×16 126 → 51 ms, 256 at 8×8 69 → 41 ms; 512 at 4×4 157 →
149 ms (the border is most of a 4×4 image). :func:`worth_it` picks this path from a count of
multiply-adds (:data:`COST_FRACTION`), on CPU (where it was measured).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: this path is taken when its multiply-adds are below this fraction of the unfold Gram's
#: ``R·(C·K)²``. The count leaves out writing the (C·K)² blocks into the channel-major layout
#: (strided, about 5 ns per entry: 105 ms for 512 channels, 3×3), so the time ratio is higher
#: than the count's: measured 0.23 / 0.41 / 0.59 / 0.95 of the unfold's time where the count
#: says 0.19 / 0.22 / 0.28 / 0.42 (3×3, 32² / 16² / 8² / 4² images, module docstring).
COST_FRACTION = 0.3
#: and the factor has at least this dimension (below, the unfold is already cheap and the
#: Python loop over offset pairs dominates)
MIN_DIMENSION = 256

Range = tuple[int, int]


@dataclass(frozen=True)
class Pair:
    """One block (u, v) of A, u ≤ v in the kernel's row-major offset order."""

    u: int
    v: int
    shift: tuple[int, ...]  # (v − u) in kernel steps, per axis
    delta: tuple[int, ...]  # (v − u)·dilation, in positions
    strips: tuple[tuple[Range, ...], ...]  # boxes of z (image coordinates) to subtract


@dataclass(frozen=True)
class Plan:
    """Everything that depends on shapes only (cached)."""

    size: tuple[int, ...]  # image size per axis
    extended: tuple[int, ...]  # with (k − 1)·d trailing zeros per axis
    strides: tuple[int, ...]  # of the flattened extended image, in rows, per axis
    margin: int  # zero rows before and after the flattened batch (the largest flat shift)
    pairs: tuple[Pair, ...]
    windows: tuple[tuple[Range, ...], ...]  # per offset u: W_u clipped to the image
    kernel_size: int  # K, the kernel's offsets
    positions: int  # output positions per sample
    macs_per_channel_pair: int  # multiply-adds / C² (batch size 1)
    unfold_macs_per_channel_pair: int  # the unfold Gram's, / C² (batch size 1)


def _intersect(a: Range, b: Range) -> Range:
    return max(a[0], b[0]), min(a[1], b[1])


@functools.lru_cache(maxsize=256)
def plan(
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[Range, ...],
) -> Plan:
    """The offset pairs and their strips for an image of ``size`` (padding: (before, after)
    per axis). Strip boxes for pair (u, v), axis i: ``W_u ∩ J`` on the axes before i, one side
    of ``J_i \\ W_u,i`` on axis i, ``J`` on the axes after (a disjoint cover of J \\ W_u)."""
    rank = len(size)
    gaps = [(k - 1) * d for k, d in zip(kernel, dilation)]
    out = [s + lo + hi - g for s, (lo, hi), g in zip(size, padding, gaps)]
    extended = tuple(s + g for s, g in zip(size, gaps))
    strides = tuple(math.prod(extended[i + 1 :]) for i in range(rank))
    margin = sum(g * f for g, f in zip(gaps, strides))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    window = [
        tuple(
            (u_i * d - lo, u_i * d - lo + o)
            for u_i, d, (lo, _), o in zip(u, dilation, padding, out)
        )
        for u in offsets
    ]
    pairs, strip_macs = [], 0
    for iu, u in enumerate(offsets):
        for iv in range(iu, len(offsets)):
            shift = tuple(b - a for a, b in zip(u, offsets[iv]))
            delta = tuple(e * d for e, d in zip(shift, dilation))
            joint = [(max(0, -dd), min(s, s - dd)) for dd, s in zip(delta, size)]
            strips = []
            for i in range(rank):
                inside = _intersect(window[iu][i], joint[i])
                sides = [
                    (joint[i][0], min(inside[0], joint[i][1])),
                    (max(inside[1], joint[i][0]), joint[i][1]),
                ]
                for side in sides:
                    box = (
                        *[_intersect(window[iu][j], joint[j]) for j in range(i)],
                        side,
                        *joint[i + 1 :],
                    )
                    if all(a < b for a, b in box):
                        strips.append(box)
                        strip_macs += math.prod(b - a for a, b in box)
            pairs.append(Pair(iu, iv, shift, delta, tuple(strips)))
    shifts = {p.shift for p in pairs} | {tuple(-e for e in p.shift) for p in pairs}
    correlations = (len(shifts) + 1) // 2  # T_−δ = T_δᵀ
    K, positions = len(offsets), math.prod(out)
    return Plan(
        size=tuple(size),
        extended=extended,
        strides=strides,
        margin=margin,
        pairs=tuple(pairs),
        windows=tuple(tuple(_intersect(w, (0, s)) for w, s in zip(win, size)) for win in window),
        kernel_size=K,
        positions=positions,
        macs_per_channel_pair=correlations * math.prod(extended) + strip_macs,
        unfold_macs_per_channel_pair=positions * K * K,
    )


def worth_it(p: Plan, channels: int) -> bool:
    """Whether :func:`shifted_gram` beats unfolding (module docstring: the cost rule)."""
    return (
        channels * p.kernel_size >= MIN_DIMENSION
        and p.macs_per_channel_pair < COST_FRACTION * p.unfold_macs_per_channel_pair
    )


def shifted_gram(x: Tensor, p: Plan, bias: bool) -> Tensor:
    """``Σ ā āᵀ`` (1, C·K [+1], C·K [+1]) of a stride-1, one-group, zero-padded convolution's
    patches (columns channel-major, kernel offsets row-major: ``weight.reshape(out, -1)``'s
    order, a trailing 1 with a bias), computed in x's dtype from ``x`` (N, C, *size)."""
    N, C = x.shape[:2]
    rank = len(p.size)
    per_sample = math.prod(p.extended)
    rows = x.new_zeros(p.margin + N * per_sample + p.margin, C)
    image = rows[p.margin : p.margin + N * per_sample].view(N, *p.extended, C)
    image[(slice(None), *[slice(0, s) for s in p.size])] = x.movedim(1, -1)
    lo, hi = p.margin, p.margin + N * per_sample
    correlation: dict[tuple[int, ...], Tensor] = {}

    def full(shift: tuple[int, ...], delta: tuple[int, ...]) -> Tensor:
        if shift not in correlation:
            mirror = tuple(-e for e in shift)
            if mirror in correlation:
                return correlation[mirror].T
            offset = sum(dd * f for dd, f in zip(delta, p.strides))
            correlation[shift] = rows[lo:hi].T @ rows[lo + offset : hi + offset]
        return correlation[shift]

    K = p.kernel_size
    A = x.new_empty(C, K, C, K)
    for pair in p.pairs:
        block = full(pair.shift, pair.delta)
        for box in pair.strips:
            here = image[(slice(None), *[slice(a, b) for a, b in box])].reshape(-1, C)
            there = image[
                (slice(None), *[slice(a + dd, b + dd) for (a, b), dd in zip(box, pair.delta)])
            ].reshape(-1, C)
            block = block - here.T @ there
        if pair.u == pair.v:  # exactly symmetric, as the unfold Gram (gram) is
            block = block.tril() + block.tril(-1).T
        A[:, pair.u, :, pair.v] = block
        if pair.u != pair.v:
            A[:, pair.v, :, pair.u] = block.T
    A = A.reshape(C * K, C * K)
    if not bias:
        return A.unsqueeze(0)
    sums = torch.stack(
        [
            x[(slice(None), slice(None), *[slice(a, b) for a, b in window])].sum(
                dim=(0, *range(2, 2 + rank))
            )
            for window in p.windows
        ],
        dim=1,
    ).reshape(-1)
    out = x.new_empty(C * K + 1, C * K + 1)
    out[:-1, :-1] = A
    out[:-1, -1] = sums
    out[-1, :-1] = sums
    out[-1, -1] = N * p.positions
    return out.unsqueeze(0)
