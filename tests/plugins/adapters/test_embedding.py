"""EmbeddingAdapter: a linear layer on one-hot inputs (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.plugins.adapters.embedding import EmbeddingAdapter

DT = torch.float64
ADAPTER = EmbeddingAdapter()


@pytest.mark.parametrize("shape", [(12,), (3, 5), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_statistics_are_onehot_linear_layer(shape):
    V, D = 7, 4
    m = nn.Embedding(V, D).double()
    idx = torch.randint(0, V - 1, shape)  # token V−1 never occurs
    out = m(idx)
    g = torch.randn_like(out)
    H = ADAPTER.input_diagonal(m, idx, out, DT)
    S = ADAPTER.output_diagonal(m, g, DT)
    R = idx.numel()
    assert H.count == S.count == R
    onehot = F.one_hot(idx.reshape(-1), V).to(DT)  # ā rows of the equivalent Linear(V, D)
    torch.testing.assert_close(H.total / H.count, (onehot**2).mean(0), rtol=1e-12, atol=0)
    assert H.total[V - 1] == 0
    torch.testing.assert_close(
        S.total / S.count, (g.reshape(R, D) ** 2).mean(0), rtol=1e-12, atol=0
    )
    # the same layer written as z = onehot @ W gives the same output and the same gradient
    torch.testing.assert_close(onehot @ m.weight, out.reshape(R, D))


def test_curvature_is_squared_gradient_for_one_token():
    m = nn.Embedding(6, 3).double()
    idx = torch.tensor([4])
    out = m(idx)
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, [m.weight], g)
    H = ADAPTER.input_diagonal(m, idx, out, DT)
    S = ADAPTER.output_diagonal(m, g, DT)
    curv = ADAPTER.curvature(m, H.total / H.count, S.total / S.count)
    assert set(curv) == {"weight"} and curv["weight"].shape == (6, 3)
    torch.testing.assert_close(curv["weight"], gw**2, rtol=1e-12, atol=0)


def test_curvature_layout_vocab_by_dim():
    m = nn.Embedding(5, 3).double()
    H = torch.rand(5, dtype=DT)
    S = torch.rand(3, dtype=DT)
    curv = ADAPTER.curvature(m, H, S)["weight"]
    for v in range(5):
        for d in range(3):
            assert curv[v, d] == H[v] * S[d]


def test_parameters_are_weight_only():
    m = nn.Embedding(5, 3)
    assert list(ADAPTER.parameters(m)) == ["weight"]
