"""A small GPT (Radford et al. 2019 layout): token + position embeddings, pre-LN blocks of causal
self-attention and a GELU MLP, a final LayerNorm and a head tied to the token embedding.

Attention is written with ``nn.Linear`` q/k/v/output projections and
``F.scaled_dot_product_attention(is_causal=True)`` rather than ``nn.MultiheadAttention`` (which
uses its ``out_proj`` weight functionally): every weight then belongs to a Linear, LayerNorm or
Embedding that a curvature optimizer can capture.
"""

from __future__ import annotations

import gin
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0, is_causal=True,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with a 4× GELU hidden layer."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """forward(idx: LongTensor (B, T)) -> logits (B, T, vocab_size); T ≤ context."""

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layers) ** 0.5)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.head(self.ln_f(self.blocks(x)))


@gin.configurable(module="models")
def gpt(
    vocab_size: int = 256,
    context: int = 128,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    dropout: float = 0.0,
    tie_weights: bool = True,
) -> nn.Module:
    """A small pre-LN GPT with causal self-attention and (by default) a tied head."""
    return GPT(vocab_size, context, d_model, n_layers, n_heads, dropout, tie_weights)
