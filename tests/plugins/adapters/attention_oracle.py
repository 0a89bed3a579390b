"""An independent attention built from ``nn.Linear`` layers: the oracle of the MHA adapter tests.

``LinearAttention.from_mha(mha)`` holds the same weights as an ``nn.MultiheadAttention`` in four
``nn.Linear`` layers named ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (so curvlab pairs
them with the verified ``linear`` adapter, under the same layer names as the MHA blocks) and
computes attention batch-first, written from the definition rather than from torch's code. The
gradients at the appended ``bias_k`` / ``bias_v`` positions are recorded by tensor hooks
(``kv_bias_grads``), the reference for those blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LinearAttention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int,
        vdim: int,
        bias: bool,
        add_bias_kv: bool,
        add_zero_attn: bool,
        batch_first: bool,
    ) -> None:
        super().__init__()
        self.e, self.h = embed_dim, num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.bias_k = nn.Parameter(torch.zeros(embed_dim)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(embed_dim)) if add_bias_kv else None
        self.add_zero_attn = add_zero_attn
        self.batch_first = batch_first
        self.kv_bias_grads: dict[str, list[Tensor]] = {"bias_k": [], "bias_v": []}

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> LinearAttention:
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        out = cls(
            e,
            mha.num_heads,
            mha.kdim,
            mha.vdim,
            bias,
            mha.bias_k is not None,
            mha.add_zero_attn,
            mha.batch_first,
        )
        out = out.to(mha.out_proj.weight.dtype)
        with torch.no_grad():
            for i, layer in enumerate((out.q_proj, out.k_proj, out.v_proj)):
                if mha._qkv_same_embed_dim:
                    layer.weight.copy_(mha.in_proj_weight[i * e : (i + 1) * e])
                else:
                    layer.weight.copy_(getattr(mha, "qkv"[i] + "_proj_weight"))
                if bias:
                    layer.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
            out.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                out.out_proj.bias.copy_(mha.out_proj.bias)
            if out.bias_k is not None:
                out.bias_k.copy_(mha.bias_k.reshape(-1))
                out.bias_v.copy_(mha.bias_v.reshape(-1))
        return out

    def _appended(self, name: str, n: int) -> Tensor:
        rows = getattr(self, name).reshape(1, 1, -1).repeat(n, 1, 1)  # one row per sample
        if rows.requires_grad:
            rows.register_hook(lambda g: self.kv_bias_grads[name].append(g.detach()))
        return rows

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, L, _ = query.shape
        h, d = self.h, self.e // self.h
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (N, L|S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self._appended("bias_k", n)], dim=1)
            v = torch.cat([v, self._appended("bias_v", n)], dim=1)
        q, k, v = (t.reshape(n, t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
        S = k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (N, h, L, S)
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.reshape(n, h, L, -1) if mask.dim() == 3 else mask.reshape(1, 1, L, -1)
            scores = scores + nn.functional.pad(mask, (0, S - mask.shape[-1]))
        if key_padding_mask is not None:
            mask = _additive(key_padding_mask, q.dtype)
            scores = scores + nn.functional.pad(mask, (0, S - mask.shape[-1]))[:, None, None, :]
        weights = scores.softmax(-1)
        y = (weights @ v).transpose(1, 2).reshape(n, L, self.e)
        y = self.out_proj(y)
        if unbatched:
            y, weights = y[0], weights[0]
        elif not self.batch_first:
            y = y.transpose(0, 1)
        if not need_weights:
            return y, None
        return y, weights.mean(-3) if average_attn_weights else weights


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, -math.inf)
    return mask.to(dtype)
