"""AdaFisher with its default adapters covers Conv1d, Conv3d(+BatchNorm3d) and ConvTranspose
(+GroupNorm) networks completely and trains them; the "conv2d" name keeps old checkpoints
loading; the official variant keeps its four layer types."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.plugins.adapters.conv2d import Conv2dAdapter
from curvlab.plugins.adapters.conv_transpose import ConvTransposeAdapter
from curvlab.plugins.adapters.convolution import ConvolutionAdapter


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv1d(8, 4, 3, padding="same", bias=False),
        nn.Flatten(),
        nn.Linear(4 * 8, 3),
    )


def conv3d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, 4, 2, stride=2, padding_mode="reflect"),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2 * 2, 3),
    )


class UNetBlock(nn.Module):
    """Down (stride-2 conv), up (ConvTranspose2d), skip connection, 1×1 head; GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm_down = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.norm_up = nn.GroupNorm(2, 4)
        self.head = nn.Conv2d(4 + 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm_down(self.down(x)))
        h = F.relu(self.norm_up(self.up(h)))
        return self.head(torch.cat([h, x], dim=1))


def classification(shape, classes=3, n=64):
    """A learnable task: labels from a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=gen)
    w = torch.randn(x[0].numel(), classes, generator=gen)
    return x, (x.flatten(1) @ w).argmax(1)


def train(model, x, y, loss_fn, steps=20, **kwargs):
    opt = curvlab.AdaFisher(model, **kwargs)
    assert opt.fallback_parameters() == []
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


@pytest.mark.parametrize(
    "make, shape, lr",
    [(conv1d_net, (2, 16), 1e-2), (conv3d_net, (1, 4, 4, 4), 3e-3)],
    ids=["conv1d", "conv3d_batchnorm3d"],
)
def test_classifiers_are_covered_and_train(make, shape, lr):
    torch.manual_seed(0)
    model = make()
    x, y = classification(shape)
    opt, losses = train(model, x, y, F.cross_entropy, lr=lr)
    conv_adapters = {
        type(r.adapter) for r in opt.layers if isinstance(r.module, nn.modules.conv._ConvNd)
    }
    assert conv_adapters == {ConvolutionAdapter}
    assert all(r.captured for r in opt.layers)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_unet_block_with_conv_transpose_is_covered_and_trains():
    torch.manual_seed(0)
    model = UNetBlock()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    target = F.avg_pool2d(x[:, :1], 3, stride=1, padding=1)  # a local smoothing to learn
    # AdaFisher's default lr: entries with min-max F ≈ λ step α/λ = 1 per unit of m̂ (at 3e-3
    # this block diverges with or without the ConvTranspose2d covered)
    opt, losses = train(model, x, target, F.mse_loss, lr=1e-3)
    adapters = {r.name: type(r.adapter) for r in opt.layers}
    assert adapters["up"] is ConvTransposeAdapter
    assert adapters["down"] is adapters["head"] is Conv2dAdapter
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_conv2d_checkpoint_from_the_previous_adapter_list_loads():
    """A state saved by an optimizer with the adapter list before this change
    (``["linear", "conv2d", ...]``) loads into today's default: Conv2d layers are still
    described as Conv2dAdapter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    old = curvlab.AdaFisher(
        model,
        adapters=["linear", "conv2d", "batchnorm", "layernorm", "groupnorm", "embedding"],
    )
    F.cross_entropy(model(torch.randn(4, 2, 6, 6)), torch.tensor([0, 1, 0, 1])).backward()
    old.step()
    new = curvlab.AdaFisher(model)
    new.load_state_dict(old.state_dict())
    assert [type(r.adapter) for r in new.layers][0] is Conv2dAdapter
    torch.testing.assert_close(new.curvature_state["0"]["H"], old.curvature_state["0"]["H"])


def test_official_variant_keeps_its_layer_types():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvlab.AdaFisher(model, variant="official")
    assert [f.name for f in opt.fallback_parameters()] == ["0.weight", "0.bias"]
