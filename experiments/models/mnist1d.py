"""The four models of the MNIST-1D benchmark (Greydanus, 2020), written here to the published
architectures (the repository's notebooks/models.py), with PyTorch's default initialisation.

Every model takes sequences of shape (N, 40) (or (N, 1, 40)) and returns (N, 10) logits.

========================  ============================================================  ======
model (gin)               layers                                                        params
========================  ============================================================  ======
``mnist1d_logistic``      Linear 40 → 10                                                   410
``mnist1d_mlp``           Linear 40 → 100, ReLU; h + ReLU(Linear 100 → 100); Linear → 10  15 210
``mnist1d_cnn``           Conv1d 1→25 k5 s2 p1, Conv1d 25→25 k3 s2 p1 (×2), ReLU after     5 210
                          each (lengths 40 → 19 → 10 → 5); flatten 125 → Linear 10
``mnist1d_gru``           bidirectional GRU, input 1 per step, hidden 6; all 40 outputs    5 134
                          flattened (2·6·40 = 480) → Linear 10
========================  ============================================================  ======

Published test accuracies: 32%, 68%, 94%, 91% (docs/results/mnist1d.md reproduces them).
``mnist1d_cnn(batch_norm=True)`` (not published) puts a BatchNorm1d between each convolution and
its ReLU (+150 parameters), so that the study can ablate the Fisher of normalisation layers,
which the published models lack.
"""

from __future__ import annotations

import gin
import torch
from torch import Tensor, nn

SEQUENCE_LENGTH = 40
NUM_CLASSES = 10


def _flat(x: Tensor) -> Tensor:
    """(N, 40) or (N, 1, 40) → (N, 40)."""
    return x.reshape(x.shape[0], -1)


class Mnist1dLogistic(nn.Module):
    """Multinomial logistic regression: one Linear layer on the raw sequence."""

    def __init__(self, length: int = SEQUENCE_LENGTH, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.linear = nn.Linear(length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_flat(x))


class Mnist1dMLP(nn.Module):
    """h₁ = ReLU(W₁x), h₂ = h₁ + ReLU(W₂h₁) (residual), logits W₃h₂."""

    def __init__(
        self, length: int = SEQUENCE_LENGTH, hidden: int = 100, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.linear1(_flat(x)))
        h = h + torch.relu(self.linear2(h))
        return self.linear3(h)


class Mnist1dCNN(nn.Module):
    """Three strided Conv1d + ReLU layers and a linear classifier on the flattened features;
    ``batch_norm`` adds a BatchNorm1d before each ReLU (not in the published model)."""

    def __init__(
        self,
        channels: int = 25,
        length: int = SEQUENCE_LENGTH,
        num_classes: int = NUM_CLASSES,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        norm = nn.BatchNorm1d if batch_norm else lambda _: nn.Identity()
        self.norm1, self.norm2, self.norm3 = norm(channels), norm(channels), norm(channels)
        for conv in (self.conv1, self.conv2, self.conv3):  # L_out = ⌊(L + 2p − k)/s⌋ + 1
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = _flat(x).unsqueeze(1)  # (N, 1, L)
        h = torch.relu(self.norm1(self.conv1(h)))
        h = torch.relu(self.norm2(self.conv2(h)))
        h = torch.relu(self.norm3(self.conv3(h)))
        return self.linear(h.flatten(1))


class Mnist1dGRU(nn.Module):
    """Bidirectional GRU over the sequence (one scalar per step, zero initial state); the
    outputs of every step, both directions, are flattened into a linear classifier."""

    def __init__(
        self, hidden: int = 6, length: int = SEQUENCE_LENGTH, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.gru(_flat(x).unsqueeze(-1))  # (N, L, 2·hidden)
        return self.linear(outputs.flatten(1))


@gin.configurable(module="models")
def mnist1d_logistic() -> nn.Module:
    return Mnist1dLogistic()


@gin.configurable(module="models")
def mnist1d_mlp(hidden: int = 100) -> nn.Module:
    return Mnist1dMLP(hidden=hidden)


@gin.configurable(module="models")
def mnist1d_cnn(channels: int = 25, batch_norm: bool = False) -> nn.Module:
    return Mnist1dCNN(channels=channels, batch_norm=batch_norm)


@gin.configurable(module="models")
def mnist1d_gru(hidden: int = 6) -> nn.Module:
    return Mnist1dGRU(hidden=hidden)
