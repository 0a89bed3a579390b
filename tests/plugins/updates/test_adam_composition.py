"""configs/adam.gin (squared-gradient estimator + EMA with bias correction + √ + ε after the
root + bias-corrected momentum) is torch.optim.Adam."""

import pytest
import torch
from torch import nn

import curvlab


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_composition_matches_torch_adam(weight_decay):
    ours, ref = model(), model()
    opt = curvlab.build_optimizer(
        ours,
        "configs/adam.gin",
        bindings=[f"optimizer.weight_decay = {weight_decay}", "optimizer.lr = 1e-2"],
    )
    ref_opt = torch.optim.Adam(
        ref.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = (
            torch.randn(16, 5, generator=g, dtype=torch.float64),
            torch.randn(16, 3, generator=g, dtype=torch.float64),
        )
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    assert not torch.allclose(next(ours.parameters()), next(model().parameters()))  # it trained


def test_adam_composition_needs_no_supported_layer():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return (self.w * x).sum()

    m = Bare()
    opt = curvlab.build_optimizer(m, "configs/adam.gin")
    m(torch.ones(3, dtype=torch.float64)).backward()
    opt.step()
    assert opt.fallback_parameters() == []
    torch.testing.assert_close(m.w.detach(), torch.full((3,), 1 - 1e-3, dtype=torch.float64))
