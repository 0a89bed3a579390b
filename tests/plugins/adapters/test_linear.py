"""LinearAdapter statistics vs the straightforward formula (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.plugins.adapters.linear import LinearAdapter

DT = torch.float64
ADAPTER = LinearAdapter()


def rows_of(x, bias):
    r = x.reshape(-1, x.shape[-1])
    if bias:
        r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], 1)
    return r


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "shape", [(6, 4), (3, 5, 4), (2, 3, 2, 4), (4,)], ids=["2d", "3d", "4d", "1d"]
)
def test_input_and_output_diagonal(shape, bias):
    m = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(*shape, dtype=DT) + 0.3
    out = m(x)
    g = torch.randn_like(out)
    R = x.numel() // 4
    H = ADAPTER.input_diagonal(m, x, out, DT)
    S = ADAPTER.output_diagonal(m, g, DT)
    assert H.count == S.count == R
    # written out: H_i = (1/R) Σ_rows x_i² and the bias entry (1/R) Σ_rows 1² = 1
    xr = x.reshape(R, 4)
    want_H = [sum(xr[r, i] ** 2 for r in range(R)) / R for i in range(4)] + ([1.0] if bias else [])
    torch.testing.assert_close(
        H.total / H.count, torch.tensor(want_H, dtype=DT), rtol=1e-12, atol=0
    )
    gr = g.reshape(R, 3)
    want_S = torch.tensor([sum(gr[r, o] ** 2 for r in range(R)) / R for o in range(3)], dtype=DT)
    torch.testing.assert_close(S.total / S.count, want_S, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)], ids=["2d", "3d"])
def test_rows(shape, bias):
    m = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(*shape, dtype=DT)
    g = torch.randn(*shape[:-1], 3, dtype=DT)
    # LayerAdapter contract: input rows as (groups, rows, in[+1]), one group for Linear
    torch.testing.assert_close(ADAPTER.input_rows(m, x), rows_of(x, bias)[None], rtol=0, atol=0)
    torch.testing.assert_close(ADAPTER.output_rows(m, g), g.reshape(-1, 3), rtol=0, atol=0)
    # the rows reproduce the gradient: dW = Σ_rows g āᵀ
    out = m(x)
    grads = torch.autograd.grad(out, list(ADAPTER.parameters(m).values()), g)
    gW = ADAPTER.output_rows(m, g).T @ ADAPTER.input_rows(m, x)[0]
    torch.testing.assert_close(grads[0], gW[:, :4], rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(grads[1], gW[:, 4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_curvature_is_squared_per_example_gradient_for_one_row(bias):
    m = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(1, 4, dtype=DT)
    out = m(x)
    g = torch.randn_like(out)
    params = ADAPTER.parameters(m)
    assert list(params) == (["weight", "bias"] if bias else ["weight"])
    grads = torch.autograd.grad(out, list(params.values()), g)
    H = ADAPTER.input_diagonal(m, x, out, DT)
    S = ADAPTER.output_diagonal(m, g, DT)
    curv = ADAPTER.curvature(m, H.total / H.count, S.total / S.count)
    for (role, _), gr in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(curv[role], gr**2, rtol=1e-12, atol=1e-15)


def test_curvature_layout():
    m = nn.Linear(4, 3).double()
    H = torch.rand(5, dtype=DT)
    S = torch.rand(3, dtype=DT)
    curv = ADAPTER.curvature(m, H, S)
    for o in range(3):
        for i in range(4):
            assert curv["weight"][o, i] == S[o] * H[i]
        assert curv["bias"][o] == S[o] * H[4]


def test_float32_input_accumulates_in_float64():
    m = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    stat = ADAPTER.input_diagonal(m, x, m(x), torch.float64)
    assert stat.total.dtype == torch.float64
    torch.testing.assert_close(
        stat.total / stat.count, (rows_of(x.double(), True) ** 2).mean(0), rtol=1e-12, atol=0
    )
