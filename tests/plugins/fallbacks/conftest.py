"""A model with covered layers and parameters no adapter covers (an LSTM, a raw parameter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

DT = torch.float64
LAM = 1e-3


class LSTMNet(nn.Module):
    """Linear (covered) → LSTM (fallback: 4 tensors) → × scale (raw parameter) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.lstm(torch.tanh(self.inp(x)))
        return self.head(h[:, -1] * self.scale)


#: the fallback parameters of LSTMNet, in pairing order
FALLBACK_NAMES = [
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "lstm.bias_ih_l0",
    "lstm.bias_hh_l0",
    "scale",
]


def make_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
        for _ in range(n)
    ]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture
def model() -> LSTMNet:
    torch.manual_seed(0)
    return LSTMNet().double()
