"""A GPT built from PyTorch's own blocks: ``nn.TransformerEncoderLayer`` (pre-LN, GELU,
``nn.MultiheadAttention`` with a causal mask), token + position embeddings, a final LayerNorm
and a head tied to the token embedding (or not).

The same sizes as :mod:`curvlab.experiments.models.gpt`, whose attention is written with
``nn.Linear`` projections; here the attention is ``nn.MultiheadAttention`` (packed
``in_proj_weight``, ``out_proj`` applied functionally), which curvlab covers through the
``multihead_attention`` adapter. ``curvlab bench --models gpt_mha`` times it.
"""

from __future__ import annotations

import gin
import torch
from torch import Tensor, nn


class TransformerGPT(nn.Module):
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
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        # pre-LN layers never take the nested-tensor path: do not ask for it
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )
        self._init(n_layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init(self, n_layers: int) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases, residual projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("out_proj.weight", "linear2.weight")):
                    std = 0.02 / (2 * n_layers) ** 0.5
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        mask = self.causal_mask[:t, :t].to(x.dtype)
        return self.head(self.ln_f(self.blocks(x, mask=mask, is_causal=True)))


@gin.configurable(module="models")
def transformer_gpt(
    vocab_size: int = 256,
    context: int = 128,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    dropout: float = 0.0,
    tie_weights: bool = True,
) -> nn.Module:
    """A small pre-LN GPT of ``nn.TransformerEncoderLayer`` blocks (nn.MultiheadAttention)."""
    return TransformerGPT(vocab_size, context, d_model, n_layers, n_heads, dropout, tie_weights)
