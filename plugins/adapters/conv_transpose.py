"""nn.ConvTranspose1d / 2d / 3d: any stride, padding, output_padding, dilation, groups, bias;
batched or unbatched input. Derivation in docs/math.md ("Transposed convolutions")."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.plugins.adapters.convolution import (
    batched,
    gather_rows,
    output_rows_of,
    output_square_sum,
    spatial_rank,
    window_statistic,
)
from curvlab.registry import register
from curvlab.transfer import to_device_async


def output_size(module: nn.Module, input_size: tuple[int, ...]) -> tuple[int, ...]:
    """``T = (J − 1)·s − 2p + d·(k − 1) + output_padding + 1`` per axis, from the module's own
    ``output_padding`` (a forward call with ``output_size=`` may choose another one)."""
    return tuple(
        (j - 1) * s - 2 * p + d * (k - 1) + op + 1
        for j, s, p, d, k, op in zip(
            input_size,
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
            module.output_padding,
        )
    )


def _source_table(out: int, kernel: int, stride: int, dilation: int, padding: int) -> Tensor:
    """(T, k) table of ``u = t + p − i·d``: kernel offset i at output position t reads input
    position j = u / s when s divides u (and 0 ≤ j < J)."""
    return torch.arange(out)[:, None] + padding - torch.arange(kernel)[None, :] * dilation


@functools.lru_cache(maxsize=256)
def transposed_selection(
    size: int,
    out: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(kernel, size) 0/1 matrix: row i marks the input positions j whose product with kernel
    offset i lands inside the output, ``0 ≤ j·s + i·d − p < out`` (one spatial axis)."""
    target = torch.arange(size)[None, :] * stride + torch.arange(kernel)[:, None] * dilation
    target = target - padding
    selection = ((target >= 0) & (target < out)).to(dtype)
    return to_device_async(selection, device)


def _row_indices(size: int, out: int, kernel: int, stride: int, dilation: int, padding: int):
    """(T, k) input position read by kernel offset i at output position t; ``size`` (the zero
    slot appended past the end) where no input position contributes."""
    u = _source_table(out, kernel, stride, dilation, padding)
    j = torch.div(u, stride, rounding_mode="floor")
    valid = (u - j * stride == 0) & (j >= 0) & (j < size)
    return torch.where(valid, j, torch.full_like(j, size))


@register("adapters", "conv_transpose")
class ConvTransposeAdapter(LayerAdapter):
    r"""``z = conv_transpose(x, W) + b`` for any spatial rank n (ConvTranspose1d/2d/3d).

    Per axis, input position j and kernel offset i write to output position ``t = j·s + i·d − p``
    (output size ``T = (J−1)s − 2p + d(k−1) + output_padding + 1``). So output position t is
    ``z_t[o] = Σ_{c,i} W[c, o, i] · ā_t[c, i] + b[o]`` with the row

        ā_t[c, i] = x[c, j]   if j·s + i·d − p = t on every axis for an input position j,
                    0         otherwise,

    ``C_in/groups · Π k`` entries per group (then a 1 with a bias), g_t = ∂L/∂z_t, and rows
    (sample, output position), N·T of them. The weight is stored (C_in, C_out/groups, k…): the
    Kronecker layout is ``F[c, o, i] = S[o] · H[k(c), c mod C_in/groups, i]`` per group k (the
    transpose of a convolution's (C_out, C_in/groups, k…) view).

    ``H[k] = Σ_{n,t} ā²_{n,t} / (N·T)`` per group, ``S[o] = Σ_{n,t} g²_{n,o,t} / (N·T)``.
    H needs neither zero insertion nor an unfold of the batch: each input entry appears at most
    once per kernel offset, so ``Σ_{n,t} ā²_t[c, i] = Σ_j sel[i, j] · X²[c, j]`` with
    ``X² = Σ_n x_n²`` and ``sel[i, j] = 1`` iff ``0 ≤ j·s + i·d − p < T`` (per axis: one 0/1
    selection matmul each, :func:`transposed_selection`).

    Rows (full/banded estimators) use the module's ``output_padding``; a forward call with
    ``output_size=`` that picks another output size is detected in :meth:`output_rows` where
    the sizes disagree modulo the stride (use the diagonal estimator or set ``output_padding``).
    """

    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def input_signature(self, module: nn.Module) -> Hashable:
        return (
            "conv_transpose",
            module.kernel_size,
            module.stride,
            module.padding,
            module.output_padding,
            module.dilation,
            module.groups,
            module.bias is not None,
        )

    # -- diagonal -------------------------------------------------------------------------------
    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rank = spatial_rank(module)
        x = batched(module, x)
        n = x.shape[0]
        out_size = output.shape[-rank:]  # the real one, also with forward(x, output_size=…)
        positions = math.prod(out_size)
        image = square_sum(x, 0, dtype)  # (C_in, *input spatial)
        selections = [
            transposed_selection(
                image.shape[1 + a],
                out_size[a],
                module.kernel_size[a],
                module.stride[a],
                module.dilation[a],
                module.padding[a],
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

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """``F_W[c, o, i] = S[o]·H[k, c, i]`` viewed as (groups, C_in/g, C_out/g, Πk), whose
        row-major order is the weight's (C_in, C_out/g, k…); ``F_b[o] = S[o]·H[k, −1]``."""
        g = module.groups
        c_in, o_out = module.in_channels // g, module.out_channels // g
        kernel = math.prod(module.kernel_size)
        H2 = H.reshape(g, -1)
        n_weight = c_in * kernel
        out: dict[str, tuple[Tensor, Tensor | None]] = {
            "weight": (S.reshape(g, 1, o_out, 1), H2[:, :n_weight].reshape(g, c_in, 1, kernel))
        }
        if "bias" in self.parameters(module):
            out["bias"] = (S.reshape(g, o_out), H2[:, n_weight:])
        return out

    # -- rows -----------------------------------------------------------------------------------
    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """ā rows as (groups, N·T, C_in/groups·Πk [+1]), gathered by per-axis index tables
        (no zero insertion); positions without a contributing input read a zero slot."""
        rank = spatial_rank(module)
        x = batched(module, x)
        sizes = x.shape[2:]
        out = output_size(module, tuple(sizes))
        indices = [
            to_device_async(
                _row_indices(
                    sizes[a],
                    out[a],
                    module.kernel_size[a],
                    module.stride[a],
                    module.dilation[a],
                    module.padding[a],
                ),
                x.device,
            )
            for a in range(rank)
        ]
        zero_slot = F.pad(x, (0, 1) * rank)
        return gather_rows(zero_slot, indices, module.groups, module.bias is not None)

    def batch_size(self, module: nn.Module, grad_output: Tensor) -> int:
        return grad_output.shape[0] if grad_output.dim() == spatial_rank(module) + 2 else 1

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        rank = spatial_rank(module)
        for t, s, p, d, k, op in zip(
            grad_output.shape[-rank:],
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
            module.output_padding,
        ):
            span = t - 1 - op - d * (k - 1) + 2 * p  # (J − 1)·s for the module's output_padding
            if span < 0 or span % s:
                raise ValueError(
                    f"ConvTransposeAdapter: output spatial size {tuple(grad_output.shape[-rank:])} "
                    f"does not follow from the module's output_padding={module.output_padding} "
                    f"(a forward call with output_size=?); the full/banded estimators build rows "
                    f"from module.output_padding: set it on the module or use the diagonal "
                    f"estimator"
                )
        return output_rows_of(module, grad_output)

    def to_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        """(C_in, C_out/g, k…) weight [, bias] → (groups, C_out/g, C_in/g·Πk [+1])."""
        params = self.parameters(module)
        g = module.groups
        weight = tensors.get("weight")
        if weight is None:
            weight = torch.zeros_like(params["weight"])
        c_in, o_out = weight.shape[0] // g, weight.shape[1]
        matrix = weight.reshape(g, c_in, o_out, -1).transpose(1, 2).reshape(g, o_out, -1)
        if "bias" in params:
            bias = tensors.get("bias")
            if bias is None:
                bias = matrix.new_zeros(g * o_out)
            matrix = torch.cat([matrix, bias.reshape(g, o_out, 1).to(matrix.dtype)], dim=2)
        return matrix

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`to_matrix`."""
        params = self.parameters(module)
        weight = params["weight"]
        g = module.groups
        c_in, o_out = weight.shape[0] // g, weight.shape[1]
        kernel = weight[0, 0].numel()
        matrix = matrix.reshape(g, o_out, -1)
        w = matrix[..., : c_in * kernel].reshape(g, o_out, c_in, kernel).transpose(1, 2)
        result = {"weight": w.reshape(weight.shape)}
        if "bias" in params:
            result["bias"] = matrix[..., c_in * kernel].reshape(-1)
        return result
