r"""nn.MultiheadAttention: q, k, v projections (packed or separate), bias_k / bias_v, out_proj.

Written with the module's own notation (seq-first inside, as ``F.multi_head_attention_forward``):
query rows x_q (N·L rows of E), key rows x_k (N·S rows of kdim), value rows x_v (N·S rows of
vdim). The attention is ``out_proj(softmax(q kᵀ/√d_h + mask) v)`` per head, with

    q = W_q x_q + b_q,   k = W_k x_k + b_k,   v = W_v x_v + b_v

(``W_q; W_k; W_v`` are the three row blocks of ``in_proj_weight`` when kdim = vdim = E, else
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``; ``b_q; b_k; b_v`` the row blocks of
``in_proj_bias``). Each projection is a linear layer on its own rows, so each is its own
Kronecker block, exactly the one an ``nn.Linear`` computing it would have (SPEC §3):

* block ``q_proj``: ā = [x_q, 1], g = ∂L/∂q, rows = N·L: ``H_q = Σ ā² / (N·L)``,
  ``S_q = Σ g² / (N·L)``, ``F[W_q] = S_q ⊗ H_q[:-1]``, ``F[b_q] = S_q·H_q[-1]``;
* blocks ``k_proj`` and ``v_proj``: the same with x_k / x_v and ∂L/∂k, ∂L/∂v (before bias_k /
  bias_v are appended and before zero attention is added), rows = N·S. Key positions hidden by
  ``key_padding_mask`` / ``attn_mask`` are rows too (their g is 0), as for the equivalent Linear;
* ``out_proj`` (an ``nn.Linear``) is the ``linear`` adapter's layer: ā = [attention output
  before the projection, 1], g = ∂L/∂(module output), rows = N·L;
* blocks ``bias_k`` and ``bias_v`` (``add_bias_kv=True``): the learned key/value appended at
  source position S. Each is a bias-only linear layer: ā = [1], g = ∂L/∂k (resp. v) at the
  appended position, one row per sample: ``H = [1]``, ``S = Σ_n g_n² / N``. H is a 1-entry
  factor, which min-max maps to 0 ((h − h)/(0 + ε)); so, as for the biases of normalisation
  layers (plugins/adapters/normalization.py), the bias uses ``S'`` alone: ``F = S' + λ``. These
  blocks give no rows: the full and banded estimators keep them diagonal.
* ``add_zero_attn`` appends zeros after the projections: no parameter, nothing to capture.

Self-attention (query is key is value) reads one input for q, k and v: the capture engine
computes that input statistic once (``input_signature``). Per-sample scaling (full K-FAC) uses
the batch size N, dim 1 of the seq-first tensors.

Capture: ``nn.MultiheadAttention`` computes all of this inside ``F.multi_head_attention_forward``
(``out_proj`` is applied functionally, so its hooks never fire). While statistics are gathered,
the capture engine runs ``observed_forward`` (plugins/adapters/attention_forward.py) instead:
the same operations in the same order (same values, gradients, memory layouts and dropout
random numbers), with the projections and ``out_proj`` observed. Otherwise (eval, no grad,
non-curvature steps) the module's own forward runs, fast paths included.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Observe, Statistic, square_sum
from curvlab.plugins.adapters.attention_forward import observed_forward
from curvlab.registry import register

_PROJECTIONS = ("q", "k", "v")


def _is_plain_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose forward is torch's (a subclass that overrides it
    computes something else, which :func:`observed_forward` would not reproduce)."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and type(module).forward is nn.MultiheadAttention.forward
    )


@register("adapters", "multihead_attention")
class MultiheadAttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention`` as Kronecker blocks ``q_proj``, ``k_proj``, ``v_proj`` (and
    ``bias_k``, ``bias_v`` with ``add_bias_kv``); ``out_proj`` is an ``nn.Linear`` (``linear``
    adapter). The formulas are in this module's docstring."""

    module_types = (nn.MultiheadAttention,)

    def matches(self, module: nn.Module) -> bool:
        return _is_plain_attention(module)

    def blocks(self, module: nn.Module) -> dict[str, LayerAdapter]:
        out: dict[str, LayerAdapter] = {f"{w}_proj": AttentionProjection(w) for w in _PROJECTIONS}
        for which in ("k", "v"):
            if getattr(module, f"bias_{which}", None) is not None:
                out[f"bias_{which}"] = AttentionKVBias(which)
        return out

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        out = {}
        for name, block in self.blocks(module).items():
            for role, p in block.parameters(module).items():
                out[f"{name}.{role}"] = p
        return out

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        raise TypeError("MultiheadAttentionAdapter: statistics are per block (see blocks())")

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        raise TypeError("MultiheadAttentionAdapter: statistics are per block (see blocks())")


class _AttentionBlock(LayerAdapter):
    """Shared part of the blocks: the observable forward, the batch size of seq-first rows."""

    module_types = (nn.MultiheadAttention,)

    def __init__(self, which: str) -> None:
        self.which = which

    def capture_forward(
        self, module: nn.Module, observe: Observe, *args: Any, **kwargs: Any
    ) -> Any:
        return observed_forward(module, observe, *args, **kwargs)

    def batch_size(self, module: nn.Module, grad_output: Tensor) -> int:
        return grad_output.shape[1]  # (L, N, E): unbatched input runs as N = 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.which!r})"


class AttentionProjection(_AttentionBlock):
    """Block ``q_proj`` / ``k_proj`` / ``v_proj``: a linear layer on the query / key / value
    rows (``which`` = "q", "k", "v"), weight and bias being rows of the packed parameters."""

    def __init__(self, which: str) -> None:
        if which not in _PROJECTIONS:
            raise ValueError(f"AttentionProjection: which={which!r}; choose from {_PROJECTIONS}")
        super().__init__(which)
        self.index = _PROJECTIONS.index(which)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        packed = module._qkv_same_embed_dim
        weight = module.in_proj_weight if packed else getattr(module, f"{self.which}_proj_weight")
        out = {"weight": weight}
        if module.in_proj_bias is not None:
            out["bias"] = module.in_proj_bias
        return out

    def regions(self, module: nn.Module) -> dict[str, slice]:
        e = module.embed_dim
        rows = slice(self.index * e, (self.index + 1) * e)
        out = {"weight": rows} if module._qkv_same_embed_dim else {}
        if module.in_proj_bias is not None:
            out["bias"] = rows
        return out

    def input_signature(self, module: nn.Module) -> Hashable:
        return ("attention_projection", module.in_proj_bias is not None)

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = x.numel() // x.shape[-1]
        total = _leading_square_sum(x, dtype)
        if module.in_proj_bias is not None:
            total = torch.cat([total, total.new_full((1,), rows)])
        return Statistic(total, rows)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = grad_output.numel() // grad_output.shape[-1]
        return Statistic(_leading_square_sum(grad_output, dtype), rows)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if module.in_proj_bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows[None]

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        # the block's rows of the parameters: F[o, i] = S[o]·H[i], bias F[o] = S[o]·H[-1]
        has_bias = module.in_proj_bias is not None
        n_in = H.shape[-1] - int(has_bias)
        out: dict[str, tuple[Tensor, Tensor | None]] = {"weight": (S[:, None], H[None, :n_in])}
        if has_bias:
            out["bias"] = (S, H[n_in:])
        return out

    def to_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        """The block's rows (the core passes the region): ``[W | b]`` as (1, E, in+1)."""
        params = self.parameters(module)
        e = module.embed_dim
        weight = tensors.get("weight")
        if weight is None:
            weight = params["weight"].new_zeros(e, params["weight"].shape[1])
        matrix = weight.reshape(e, -1)
        if "bias" in params:
            bias = tensors.get("bias")
            bias = matrix.new_zeros(e) if bias is None else bias.to(matrix.dtype)
            matrix = torch.cat([matrix, bias.reshape(e, 1)], dim=1)
        return matrix[None]

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
        matrix = matrix.reshape(module.embed_dim, -1)
        if module.in_proj_bias is None:
            return {"weight": matrix}
        return {"weight": matrix[:, :-1], "bias": matrix[:, -1]}


def _leading_square_sum(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ x² over every dim but the last, without copying a non-contiguous x (the key/value
    gradients come back transposed from the attention)."""
    if x.dim() == 1:
        return square_sum(x[None], 0, dtype)
    return square_sum(x, tuple(range(x.dim() - 1)), dtype)


class AttentionKVBias(_AttentionBlock):
    """Block ``bias_k`` / ``bias_v``: the learned key / value appended at source position S, a
    bias-only linear layer (ā = [1]) with one row per sample; ``F = S' + λ`` (its 1-entry H is
    left out, as for normalisation-layer biases)."""

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"bias": getattr(module, f"bias_{self.which}")}

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = x.shape[1]  # x: the appended rows, (1, N, E)
        return Statistic(torch.full((1,), float(rows), dtype=dtype, device=x.device), rows)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        rows = grad_output.numel() // grad_output.shape[-1]
        return Statistic(square_sum(grad_output.reshape(rows, -1), 0, dtype), rows)

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"bias": (S, None)}
