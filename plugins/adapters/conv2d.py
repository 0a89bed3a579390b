"""nn.Conv2d with groups, stride, padding (any mode) and dilation."""

from __future__ import annotations

import functools
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.registry import register
from curvlab.transfer import to_device_async


def explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of ``module``: int, tuple, 'valid' or 'same'."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []  # 'same': as torch does, the extra element goes to the right/bottom
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def pad_like_module(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Pad ``x`` (…, H, W) as the convolution does; square and pad commute for every mode."""
    pads = explicit_padding(module)
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if mode != "constant" and x.dim() == 3:  # reflect/replicate/circular need a batch dim
        return F.pad(x[None], pads, mode=mode)[0]
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
    """(kernel, size) 0/1 matrix: row i marks the input positions i·dilation + stride·p,
    p < out, that kernel offset i visits along one (padded) spatial dimension."""
    offsets = torch.arange(kernel)[:, None] * dilation + torch.arange(out)[None, :] * stride
    selection = torch.zeros(kernel, size, dtype=dtype)
    selection.scatter_(1, offsets, 1.0)
    return to_device_async(selection, device)


def batched(x: Tensor) -> Tensor:
    return x if x.dim() == 4 else x.unsqueeze(0)  # Conv2d also accepts unbatched (C, H, W)


@register("adapters", "conv2d")
class Conv2dAdapter(LayerAdapter):
    r"""``z = W ⋆ x + b``: ā = im2col patches of x (``C_in/groups · kh · kw`` entries, then a 1
    with a bias), g = ∂L/∂z per output position; rows = (sample, output position).

    ``H[k] = Σ_{n,t} ā_{n,t}² / (N·L)`` *per group k* (output channel o of group k uses H[k]),
    ``S[o] = Σ_{n,t} g_{n,o,t}² / (N·L)``. H needs no unfold of the batch: Σ_n x² is a single
    image, and the squared patch entries summed over positions are the window sums of that image
    (unfold of one image, then a sum over positions).
    """

    module_types = (nn.Conv2d,)

    def input_signature(self, module: nn.Module) -> Hashable:
        return (
            "conv2d",
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
        x = batched(x)
        n = x.shape[0]
        positions = output.shape[-1] * output.shape[-2]
        x2 = pad_like_module(module, square_sum(x, 0, dtype))  # (C, Hp, Wp)
        # Σ over output positions of the patch entry at kernel offset (i, j) is the sum of x2
        # over rows {i·d + s·p} and columns {j·d + s·q}: two 0/1 selection matmuls,
        # (kh, Hp) @ x2 @ (Wp, kw), instead of unfolding the image (25 µs vs 480 µs for a
        # 64-channel 32×32 input); (C, kh, kw) is the order of weight.view(C_out, -1)
        rows, cols = (
            window_selection(
                x2.shape[axis - 2],
                output.shape[axis - 2],
                module.kernel_size[axis],
                module.stride[axis],
                module.dilation[axis],
                x2.device,
                torch.float64,
            )
            for axis in (0, 1)
        )
        # in float64: the products are tiny, and a reduced matmul precision setting
        # (TF32, bf16 on CPU) must not round these sums
        total = (rows @ x2.double() @ cols.T).to(dtype).reshape(module.groups, -1)
        if module.bias is not None:
            total = torch.cat([total, total.new_full((module.groups, 1), n * positions)], dim=1)
        return Statistic(total, n * positions)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        g = batched(grad_output)
        rows = g.shape[0] * g.shape[-1] * g.shape[-2]
        return Statistic(square_sum(g, (0, 2, 3), dtype), rows)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Patches as (groups, N·L, C_in/groups·kh·kw [+1])."""
        x = pad_like_module(module, batched(x))
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        n, d, L = patches.shape
        rows = patches.reshape(n, module.groups, d // module.groups, L).permute(1, 0, 3, 2)
        rows = rows.reshape(module.groups, n * L, d // module.groups)
        if module.bias is not None:
            rows = torch.cat([rows, rows.new_ones(module.groups, n * L, 1)], dim=2)
        return rows

    def batch_size(self, module: nn.Module, grad_output: Tensor) -> int:
        return grad_output.shape[0] if grad_output.dim() == 4 else 1

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        g = batched(grad_output)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
