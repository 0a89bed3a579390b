"""The forward of ``nn.MultiheadAttention`` with its Kronecker blocks observable (the
``capture_forward`` of plugins/adapters/attention.py).

It is ``nn.MultiheadAttention.forward`` / ``F.multi_head_attention_forward`` (torch 2.13,
training path) step for step: the same operations in the same order, so the same values,
gradients, memory layouts and dropout random numbers; in addition it calls
``observe(block, x, output)`` for the q, k, v projections (right after the in-projection, before
``bias_k`` / ``bias_v`` and zero attention are appended), for the appended ``bias_k`` / ``bias_v``
rows, and for ``out_proj``. tests/plugins/adapters/test_attention.py compares it with the
module's own forward over every option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import Observe


def observed_forward(
    module: nn.MultiheadAttention,
    observe: Observe,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` in training mode with grad (torch 2.13: its fast path
    is off then), step for step as ``F.multi_head_attention_forward``, with the projections
    and ``out_proj`` observed. Tensor subclasses with ``__torch_function__``
    and nested tensors take the module's own forward (not captured)."""
    tensors = (query, key, value, module.in_proj_weight, module.in_proj_bias, module.bias_k,
               module.bias_v, module.out_proj.weight, module.out_proj.bias)  # fmt: skip
    if (
        query.is_nested
        or key.is_nested
        or value.is_nested
        or torch.overrides.has_torch_function(tensors)
    ):
        return nn.MultiheadAttention.forward(
            module, query, key, value, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal,
        )  # fmt: skip
    # nn.MultiheadAttention.forward
    sources = (query, key, value)  # rows for the input statistics: the caller's layout
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if module.batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    output, weights = _attention(
        module, observe, query, key, value, key_padding_mask, need_weights, attn_mask,
        average_attn_weights, is_causal, sources,
    )  # fmt: skip
    if module.batch_first and is_batched:
        return output.transpose(1, 0), weights
    return output, weights


def _attention(
    module: nn.MultiheadAttention,
    observe: Observe,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    sources: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` (torch 2.13) for the module's own arguments;
    ``sources`` are the query, key, value tensors as the caller passed them (the same rows,
    before transposes: read without a copy, and one tensor in self-attention)."""
    num_heads = module.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA takes the is_causal hint itself
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
    if embed_dim != module.embed_dim:
        raise AssertionError(
            f"was expecting embedding dimension of {module.embed_dim}, but got {embed_dim}"
        )
    head_dim = embed_dim // num_heads
    if module._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    elif key.shape[:2] != value.shape[:2]:
        raise AssertionError(
            f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
        )

    q, k, v = _project(module, query, key, value)
    observe("q_proj", sources[0], q)
    observe("k_proj", sources[1], k)
    observe("v_proj", sources[2], v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if module.bias_k is not None and module.bias_v is not None:
        bias_k = module.bias_k.repeat(1, bsz, 1)
        bias_v = module.bias_v.repeat(1, bsz, 1)
        observe("bias_k", bias_k, bias_k)
        observe("bias_v", bias_v, bias_v)
        k = torch.cat([k, bias_k])
        v = torch.cat([v, bias_v])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    elif module.bias_k is not None or module.bias_v is not None:
        raise AssertionError("bias_k and bias_v must both be set or both be None")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if module.add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = k.size(1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = module.dropout if module.training else 0.0

    if need_weights:
        _, _, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        output = torch.bmm(weights, v)
        output = output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        output = _out_proj(module, observe, output, tgt_len, bsz)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            output, weights = output.squeeze(1), weights.squeeze(0)
        return output, weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    output = _out_proj(module, observe, output, tgt_len, bsz)
    if not is_batched:
        output = output.squeeze(1)
    return output, None


def _split_heads(proj: Tensor, n: int, e: int) -> tuple[Tensor, ...]:
    """(…, n·E) → n contiguous (…, E) blocks, as ``F._in_projection_packed`` lays them out."""
    proj = proj.unflatten(-1, (n, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(proj[i] for i in range(n))


def _project(
    module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v exactly as ``F._in_projection_packed`` / ``F._in_projection`` compute them
    (self-attention: one product with the packed weight; key is value: one for k and v)."""
    e = module.embed_dim
    b = module.in_proj_bias
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        if key is value and query is key:
            return _split_heads(F.linear(query, w, b), 3, e)  # type: ignore[return-value]
        if key is value:
            w_q, w_kv = w.split([e, e * 2])
            b_q, b_kv = (None, None) if b is None else b.split([e, e * 2])
            k, v = _split_heads(F.linear(key, w_kv, b_kv), 2, e)
            return F.linear(query, w_q, b_q), k, v
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        for name, x, w_x in (("query", query, w_q), ("key", key, w_k), ("value", value, w_v)):
            if w_x.shape != (e, x.size(-1)):
                raise AssertionError(
                    f"expecting {name} weights shape of {(e, x.size(-1))}, but got {w_x.shape}"
                )
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _out_proj(
    module: nn.MultiheadAttention, observe: Observe, x: Tensor, tgt_len: int, bsz: int
) -> Tensor:
    """``out_proj`` applied as torch applies it (to the (L·N, E) rows), returned as (L, N, E).

    When ``out_proj`` is a plain ``nn.Linear`` its layer is observed with the output viewed as
    (N, L, E), so that the ``linear`` adapter reads the batch size N in dim 0 (per-sample scaling
    of K-FAC); the result is that view transposed back, the same memory layout as torch's (which
    matters: dropout draws its mask in memory order). A replaced ``out_proj`` (e.g. wrapped by
    an adapter library) is left alone, as torch leaves it: its weight and bias are used.
    """
    out_proj = module.out_proj
    out = F.linear(x, out_proj.weight, out_proj.bias)
    if type(out_proj).forward is not nn.Linear.forward:
        return out.view(tgt_len, bsz, out.size(1))
    per_sample = out.view(tgt_len, bsz, out.size(1)).transpose(0, 1)
    observe("out_proj", x, per_sample)
    return per_sample.transpose(0, 1)
