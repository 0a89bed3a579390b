"""nn.Conv1d / nn.Conv2d / nn.Conv3d: any stride, padding (numbers, "valid", "same"), padding
mode, dilation, groups, bias; batched or unbatched input.

Also the pieces the transposed convolution shares (plugins/adapters/conv_transpose.py): window
sums of an image by one 0/1 selection matmul per spatial axis, and rows gathered by per-axis
index tables.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.plugins.adapters import convolution_gram
from curvlab.registry import register
from curvlab.transfer import to_device_async


def spatial_rank(module: nn.Module) -> int:
    """Number of spatial axes (1, 2 or 3) of a convolution or transposed convolution."""
    return len(module.kernel_size)


def batched(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` with a batch dimension (convolutions also accept unbatched ``(C, *spatial)``)."""
    return x if x.dim() == spatial_rank(module) + 2 else x.unsqueeze(0)


def padding_per_axis(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """The padding of ``module`` as (before, after) per spatial axis, the first axis first.
    Numbers, tuples, "valid" and "same" (as torch does, an odd total puts the extra element
    after)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return ((0, 0),) * spatial_rank(module)
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        return tuple((total // 2, total - total // 2) for total in totals)
    return tuple((p, p) for p in module.padding)


def explicit_padding(module: nn.Module) -> tuple[int, ...]:
    """The padding of ``module`` in ``F.pad`` order: (left, right) of the *last* spatial axis
    first (:func:`padding_per_axis` reversed)."""
    return tuple(side for pair in reversed(padding_per_axis(module)) for side in pair)


def pad_like_module(module: nn.Module, x: Tensor) -> Tensor:
    """Pad ``x`` (…, *spatial) as the convolution does; squaring and padding commute for every
    mode (zeros square to zero; reflect/replicate/circular copy entries)."""
    pads = explicit_padding(module)
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if mode != "constant" and x.dim() == spatial_rank(module) + 1:
        return F.pad(x[None], pads, mode=mode)[0]  # these modes want a batch dimension
    return F.pad(x, pads, mode=mode)


@functools.lru_cache(maxsize=256)
def window_selection(
    size: int,
    out: int,
    kernel: int,
    stride: int,
    dilation: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(kernel, size) 0/1 matrix: row i marks the input positions i·dilation + stride·t,
    t < out, that kernel offset i visits along one (padded) spatial axis of a convolution."""
    offsets = torch.arange(kernel)[:, None] * dilation + torch.arange(out)[None, :] * stride
    selection = torch.zeros(kernel, size, dtype=dtype)
    selection.scatter_(1, offsets, 1.0)
    return to_device_async(selection, device)


def window_statistic(
    module: nn.Module, image: Tensor, selections: Sequence[Tensor], rows: int, dtype: torch.dtype
) -> Statistic:
    """H of a (transposed) convolution from the batch-summed x² ``image`` and its per-axis
    selections: the window sums in (groups, C/groups·Πk) order, plus the bias column (every
    row contributes 1), over ``rows`` = N · output positions.

    The sums run in float64: the products are tiny, and a reduced matmul precision setting
    (TF32, bf16 on CPU) must not round them. (C, k_0, …) is weight.view(C_out, -1)'s order."""
    total = window_sums(image.double(), selections).to(dtype).reshape(module.groups, -1)
    if module.bias is not None:
        total = torch.cat([total, total.new_full((module.groups, 1), rows)], dim=1)
    return Statistic(total, rows)


def window_sums(image: Tensor, selections: Sequence[Tensor]) -> Tensor:
    """``out[c, i_0, …, i_{n−1}] = Σ_p Π_a sel_a[i_a, p_a] · image[c, p_0, …, p_{n−1}]``.

    ``image`` is (C, P_0, …, P_{n−1}) and ``selections[a]`` the (k_a, P_a) 0/1 matrix of axis
    a: the selection is a product over axes, so the sum factorises into one matmul per axis
    (for 2-D, ``sel_0 @ image @ sel_1ᵀ``). Returns (C, k_0, …, k_{n−1}).
    """
    if len(selections) == 2:  # the hot path (Conv2d): two broadcast matmuls, no reshapes
        return selections[0] @ image @ selections[1].T
    c, sizes = image.shape[0], image.shape[1:]
    kernel = [s.shape[0] for s in selections]
    y = image
    for a, sel in enumerate(selections[:-1]):  # y: (C·k_0…k_{a−1}, P_a, P_{a+1}…P_{n−1})
        rest = math.prod(sizes[a + 1 :])
        y = sel @ y.reshape(-1, sizes[a], rest)
    y = y.reshape(-1, sizes[-1]) @ selections[-1].T  # the last axis: one plain GEMM
    return y.reshape(c, *kernel)


def gather_rows(x: Tensor, indices: Sequence[Tensor], groups: int, bias: bool) -> Tensor:
    """Rows ``ā[(n, t), (c, i)] = x[n, c, indices_0[t_0, i_0], …]`` as (groups, N·L, C/groups·K
    [+1]), rows ordered (sample, t_0, …, t_{n−1}), columns (channel, i_0, …, i_{n−1}) — the
    order of ``weight.reshape(out, -1)`` of a convolution.

    ``x`` is (N, C, *spatial) and ``indices[a]`` a (T_a, k_a) integer table of positions along
    axis a (one advanced-indexing gather; a position past the end may point to a zero slot the
    caller appended)."""
    rank = len(indices)
    index = []
    for a, table in enumerate(indices):  # (T_a, k_a) at dims (2a, 2a+1) of a 2·rank-dim shape
        shape = [1] * (2 * rank)
        shape[2 * a], shape[2 * a + 1] = table.shape
        index.append(table.reshape(shape))
    patches = x[(slice(None), slice(None), *index)]  # (N, C, T_0, k_0, T_1, k_1, …)
    n = patches.shape[0]
    order = [0, *range(2, 2 + 2 * rank, 2), 1, *range(3, 3 + 2 * rank, 2)]
    rows = patches.permute(order).reshape(n * math.prod(t.shape[0] for t in indices), -1)
    return finish_rows(rows, groups, bias)


def finish_rows(rows: Tensor, groups: int, bias: bool) -> Tensor:
    """(R, C·K) rows, columns channel-major → (groups, R, C/groups·K [+1]), with a ones column
    for the bias."""
    r = rows.shape[0]
    rows = rows.reshape(r, groups, -1).transpose(0, 1)
    if bias:
        rows = torch.cat([rows, rows.new_ones(groups, r, 1)], dim=2)
    return rows.contiguous()


def output_rows_of(module: nn.Module, grad_output: Tensor) -> Tensor:
    """g rows (sample, output position) × output channel."""
    g = batched(module, grad_output)
    return g.movedim(1, -1).reshape(-1, g.shape[1])


def output_square_sum(module: nn.Module, grad_output: Tensor, dtype: torch.dtype) -> Statistic:
    """``S[o] = Σ_{n,t} g²_{n,o,t}`` with the number of (sample, position) rows."""
    g = batched(module, grad_output)
    rows = g.numel() // g.shape[1]
    return Statistic(square_sum(g, (0, *range(2, g.dim())), dtype), rows)


@register("adapters", "conv")
class ConvolutionAdapter(LayerAdapter):
    r"""``z_t = W ā_t + b`` for a convolution of any spatial rank n (Conv1d/2d/3d).

    ā_t (output position t = (t_0, …, t_{n−1})) is the im2col patch of the padded input:
    ``ā_t[c, i] = x_pad[c, t·s + i·d]`` per axis (``C_in/groups · Π k`` entries per group, then
    a 1 with a bias); g_t = ∂L/∂z_t; rows = (sample, output position), N·L of them.

    ``H[k] = Σ_{n,t} ā²_{n,t} / (N·L)`` *per group k* (output channel o of group k uses H[k]),
    ``S[o] = Σ_{n,t} g²_{n,o,t} / (N·L)`` (paper Prop. 3.3.2; SPEC §3).

    H needs no unfold of the batch: a squared patch entry is a squared input entry and padding
    commutes with squaring, so ``Σ_n Σ_t ā²_{n,t}[c, i] = Σ_t X²_pad[c, t·s + i·d]`` with
    ``X² = Σ_n x_n²`` a single image; that window sum is one 0/1 selection matmul per axis
    (:func:`window_sums`), 25 µs instead of 480 µs for unfolding a 64-channel 32×32 image.
    """

    module_types: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def input_signature(self, module: nn.Module) -> Hashable:
        return (
            "conv",
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
            module.bias is not None,
        )

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rank = spatial_rank(module)
        x = batched(module, x)
        n = x.shape[0]
        out_size = output.shape[-rank:]
        positions = math.prod(out_size)
        image = pad_like_module(module, square_sum(x, 0, dtype))  # (C, *padded)
        selections = [
            window_selection(
                image.shape[1 + a],
                out_size[a],
                module.kernel_size[a],
                module.stride[a],
                module.dilation[a],
                image.device,
                torch.float64,
            )
            for a in range(rank)
        ]
        return window_statistic(module, image, selections, n * positions, dtype)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        return output_square_sum(module, grad_output, dtype)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Patches as (groups, N·L, C_in/groups·Πk [+1])."""
        x = pad_like_module(module, batched(module, x))
        bias = module.bias is not None
        if spatial_rank(module) == 2:  # torch's im2col kernel
            patches = F.unfold(
                x, module.kernel_size, dilation=module.dilation, stride=module.stride
            )
            n, d, L = patches.shape
            return finish_rows(patches.transpose(1, 2).reshape(n * L, d), module.groups, bias)
        indices = []
        for a, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
            out = (x.shape[2 + a] - d * (k - 1) - 1) // s + 1
            table = torch.arange(out)[:, None] * s + torch.arange(k)[None, :] * d
            indices.append(to_device_async(table, x.device))
        return gather_rows(x, indices, module.groups, bias)

    def input_gram(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Statistic | None:
        """``Σ ā āᵀ`` from shifted correlations of the input, without unfolding it
        (:mod:`~curvlab.plugins.adapters.convolution_gram`): stride 1, one group, zero
        padding, and only where that is cheaper (``convolution_gram.worth_it``). On CPU only:
        the cost rule is measured there, and on a device the path's ~100 small products per
        layer would be bound by kernel launches where the unfold is one large product."""
        if (
            x.device.type != "cpu"
            or module.groups != 1
            or module.padding_mode != "zeros"
            or any(s != 1 for s in module.stride)
        ):
            return None
        x = batched(module, x)
        p = convolution_gram.plan(
            tuple(x.shape[2:]),
            tuple(module.kernel_size),
            tuple(module.dilation),
            padding_per_axis(module),
        )
        if not convolution_gram.worth_it(p, x.shape[1]):
            return None
        gram = convolution_gram.shifted_gram(x.to(dtype), p, module.bias is not None)
        return Statistic(gram, x.shape[0] * p.positions)

    def batch_size(self, module: nn.Module, grad_output: Tensor) -> int:
        return grad_output.shape[0] if grad_output.dim() == spatial_rank(module) + 2 else 1

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return output_rows_of(module, grad_output)
