"""The official AdaFisher code's layer statistics (SPEC §3), for ``variant="official"``.

These reproduce its arithmetic, including its oddities, so that published numbers can be
compared: layers are matched by exact class; Conv2d pools patches over groups, ignores dilation
and divides by an extra ``C_in/groups·kh·kw``; BatchNorm2d and LayerNorm use a 2-entry H built
from the *un-normalised* input and a squared-sum S. They do not reproduce its pairing of
parameters by position: pairing is by identity, as everywhere in curvlab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.plugins.adapters.conv2d import Conv2dAdapter, batched, pad_like_module
from curvlab.plugins.adapters.linear import LinearAdapter
from curvlab.registry import register


@register("adapters", "official_linear")
class OfficialLinearAdapter(LinearAdapter):
    """Same statistics as :class:`LinearAdapter`; exact class ``nn.Linear`` only."""

    exact_type = True


@register("adapters", "official_conv2d")
class OfficialConv2dAdapter(Conv2dAdapter):
    r"""Patches taken per group and pooled (rows N·groups·L', columns C_in/groups·kh·kw [+1]),
    dilation ignored (L' = positions of the undilated unfold):
    ``H = Σ_rows ā² / (N·L'·C_in/groups·kh·kw)``; ``S = Σ_{n,t} g² / (N·L)``."""

    exact_type = True

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        x = batched(x)
        n = x.shape[0]
        x2 = pad_like_module(module, square_sum(x, 0, dtype))
        windows = F.unfold(x2[None], module.kernel_size, stride=module.stride)[0]  # no dilation
        positions = windows.shape[-1]
        total = windows.sum(-1).reshape(module.groups, -1).sum(0)  # pooled over groups
        columns = total.numel()
        if module.bias is not None:
            total = torch.cat([total, total.new_full((1,), n * module.groups * positions)])
        return Statistic(total, n * positions * columns)


class OfficialTwoEntryAdapter(LayerAdapter):
    """Norm layers as the official code treats them: F = kron(H, S)ᵀ has shape (C, 2); column 0
    serves the weight and column 1 the bias."""

    exact_type = True

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        out: dict[str, tuple[Tensor, Tensor | None]] = {"weight": (S, H[0])}
        if getattr(module, "bias", None) is not None:
            out["bias"] = (S, H[1])
        return out


@register("adapters", "official_batchnorm2d")
class OfficialBatchNorm2dAdapter(OfficialTwoEntryAdapter):
    r"""Input x (N, C, H, W), un-normalised: ``u_c = Σ_{n,h,w} x / (H·W)²``,
    ``H = [Σ_c u_c², C] / N²``; ``S_c = (Σ_{n,h,w} g_c)² / N``."""

    module_types = (nn.BatchNorm2d,)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return super().parameters(module) if module.affine else {}

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        n, c, h, w = x.shape
        u = x.to(dtype).sum((0, 2, 3)) / float(h * w) ** 2
        total = torch.stack([(u * u).sum(), u.new_full((), float(c))])
        return Statistic(total, n * n)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        s = grad_output.to(dtype).sum((0, 2, 3))
        return Statistic(s * s, grad_output.shape[0])


@register("adapters", "official_layernorm")
class OfficialLayerNormAdapter(OfficialTwoEntryAdapter):
    r"""Reduce every dim except dim 1: ``u_k = Σ x / P²`` (P = product of the reduced non-batch
    dims), ``H = [Σ_k u_k², K] / N²`` with K the size of dim 1; ``S_d = (Σ_{all but last} g)² / N``.
    Only a 1-D ``normalized_shape`` (as the official code assumes)."""

    module_types = (nn.LayerNorm,)

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and len(module.normalized_shape) == 1

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        n, k = x.shape[0], x.shape[1]
        dims = (0,) + tuple(range(2, x.dim()))
        p = 1
        for d in dims[1:]:
            p *= x.shape[d]
        u = x.to(dtype).sum(dims) / float(p) ** 2
        total = torch.stack([(u * u).sum(), u.new_full((), float(k))])
        return Statistic(total, n * n)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        s = grad_output.to(dtype).reshape(-1, grad_output.shape[-1]).sum(0)
        return Statistic(s * s, grad_output.shape[0])
