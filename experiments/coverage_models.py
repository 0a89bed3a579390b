"""Small models of the layer families users bring, each with a learnable task.

Used by the coverage table of docs/layers.md (``experiments/layer_coverage.py``) and by
``tests/test_coverage_models.py``, which checks that AdaFisherW at its defaults gives every one
of them (nearly) full curvature coverage and lowers its loss in 20 steps. A task is a batch
generator and a loss: the targets are a fixed function of the inputs, so there is something to
learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CoverageTask:
    """A model factory, a batch generator ``(generator) -> (inputs tuple, target)`` and a loss."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[tuple[Tensor, ...], Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


class EncoderRegressor(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, d 32, 4 heads) and a Linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(
            32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def _sequences(batch_first: bool):
    def batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        x = torch.randn(8, 10, 32, generator=g)
        # learnable: the running mean of the first 4 features over time
        target = x[..., :4].cumsum(1) / torch.arange(1, 11)[None, :, None]
        if not batch_first:
            x, target = x.transpose(0, 1), target.transpose(0, 1)
        return (x,), target

    return batch


class CrossAttention(nn.Module):
    """Cross-attention with kdim ≠ vdim ≠ embed_dim (separate q/k/v weights), bias_k/v."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(
            32, 4, kdim=24, vdim=20, batch_first=True, add_bias_kv=True
        )
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, query: Tensor, memory_k: Tensor, memory_v: Tensor) -> Tensor:
        attended, _ = self.attn(query, memory_k, memory_v, need_weights=False)
        return self.head(self.norm(query + attended))


def _cross_batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    query = torch.randn(8, 6, 32, generator=g)
    keys = torch.randn(8, 9, 24, generator=g)
    values = torch.randn(8, 9, 20, generator=g)
    target = query[..., :4] + values.mean(1, keepdim=True)[..., :4]
    return (query, keys, values), target


def _conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, padding="same", padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 14, 3),
    )


def _conv1d_batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    x = torch.randn(16, 3, 32, generator=g)
    return (x,), x[:, 0].sum(-1).gt(0).long() + x[:, 1].sum(-1).gt(0).long()


def _conv3d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3 * 3, 2),
    )


def _conv3d_batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    label = torch.randint(0, 2, (16,), generator=g)
    x = torch.randn(16, 2, 6, 6, 6, generator=g)
    x[:, 0, 1:4, 1:4, 1:4] += (2.0 * label - 1.0)[:, None, None, None]  # a class-dependent blob
    return (x,), label


class UNetBlock(nn.Module):
    """Down (strided Conv2d + GroupNorm), up (ConvTranspose2d + GroupNorm), skip, 1×1 out."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.norm_down = nn.GroupNorm(4, 16)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.norm_up = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = F.relu(self.inp(x))
        low = F.relu(self.norm_down(self.down(skip)))
        up = F.relu(self.norm_up(self.up(low)))
        return self.out(torch.cat([skip, up], dim=1))


def _unet_batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    clean = torch.randn(8, 1, 8, 8, generator=g).cumsum(-1).cumsum(-2) / 8
    return (clean + 0.3 * torch.randn(clean.shape, generator=g),), clean  # denoising


def _rmsnorm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.RMSNorm(32),
        nn.GELU(),
        nn.Linear(32, 32),
        nn.RMSNorm(32),
        nn.GELU(),
        nn.Linear(32, 3),
    )


def _mlp_batch(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    x = torch.randn(32, 16, generator=g)
    return (x,), x[:, :3].argmax(-1)


#: name → task; the names are the rows of docs/layers.md's coverage table
TASKS: dict[str, CoverageTask] = {
    "`nn.TransformerEncoder` (batch_first=True)": CoverageTask(
        lambda: EncoderRegressor(True), _sequences(True), F.mse_loss
    ),
    "`nn.TransformerEncoder` (batch_first=False)": CoverageTask(
        lambda: EncoderRegressor(False), _sequences(False), F.mse_loss
    ),
    "cross-attention, kdim 24 ≠ vdim 20 ≠ embed_dim 32": CoverageTask(
        CrossAttention, _cross_batch, F.mse_loss
    ),
    "Conv1d net": CoverageTask(_conv1d_net, _conv1d_batch, F.cross_entropy),
    "Conv3d + BatchNorm3d net": CoverageTask(_conv3d_net, _conv3d_batch, F.cross_entropy),
    "U-Net block (ConvTranspose2d, GroupNorm)": CoverageTask(UNetBlock, _unet_batch, F.mse_loss),
    "MLP with `nn.RMSNorm`": CoverageTask(_rmsnorm_mlp, _mlp_batch, F.cross_entropy),
}
