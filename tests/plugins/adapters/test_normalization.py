"""Normalisation-layer adapters (paper Prop. 3.3.1) vs x̂ and s written out by hand (float64).

Per feature c: ``H_c = mean over the normalisation set of x̂_c²``, ``S_c = mean of s_c²``
(s = gradient at the layer output); curvature ``weight = H·S``, ``bias = S``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.plugins.adapters.normalization import (
    BatchNormAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    RMSNormAdapter,
)

DT = torch.float64


def by_hand(m: nn.Module, x: torch.Tensor):
    """(x̂, dims of the normalisation set of each affine feature) from mean / biased variance."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        dims = (0,) + tuple(range(2, x.dim()))
        mu = x.mean(dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dims, keepdim=True)
        return (x - mu) / torch.sqrt(var + m.eps), dims
    if isinstance(m, nn.GroupNorm):
        n = x.shape[0]
        xg = x.reshape(n, m.num_groups, -1)
        mu = xg.mean(-1, keepdim=True)
        var = ((xg - mu) ** 2).mean(-1, keepdim=True)
        return ((xg - mu) / torch.sqrt(var + m.eps)).reshape(x.shape), (0,) + tuple(
            range(2, x.dim())
        )
    k = len(m.normalized_shape)
    norm_dims = tuple(range(x.dim() - k, x.dim()))
    if isinstance(m, nn.RMSNorm):
        eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
        xh = x / torch.sqrt((x**2).mean(norm_dims, keepdim=True) + eps)
    else:
        mu = x.mean(norm_dims, keepdim=True)
        var = ((x - mu) ** 2).mean(norm_dims, keepdim=True)
        xh = (x - mu) / torch.sqrt(var + m.eps)
    return xh, tuple(range(x.dim() - k))


CASES = [
    ("bn1d_2d", BatchNormAdapter(), lambda: nn.BatchNorm1d(4), (6, 4)),
    ("bn1d_3d", BatchNormAdapter(), lambda: nn.BatchNorm1d(4), (5, 4, 3)),
    ("bn2d", BatchNormAdapter(), lambda: nn.BatchNorm2d(3), (4, 3, 3, 2)),
    ("bn3d", BatchNormAdapter(), lambda: nn.BatchNorm3d(2), (3, 2, 2, 2, 3)),
    ("ln_3d_input", LayerNormAdapter(), lambda: nn.LayerNorm(5), (3, 4, 5)),
    ("ln_2d_shape", LayerNormAdapter(), lambda: nn.LayerNorm((3, 4)), (2, 5, 3, 4)),
    ("ln_no_bias", LayerNormAdapter(), lambda: nn.LayerNorm(5, bias=False), (6, 5)),
    ("gn", GroupNormAdapter(), lambda: nn.GroupNorm(2, 6), (3, 6, 2, 3)),
    ("gn_1d", GroupNormAdapter(), lambda: nn.GroupNorm(3, 3), (4, 3, 5)),
    ("rms", RMSNormAdapter(), lambda: nn.RMSNorm(4), (3, 2, 4)),
]


def _data(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    # features with different scales/offsets so that H differs between features
    x = torch.randn(*shape, generator=gen, dtype=DT)
    return x * torch.linspace(0.5, 3.0, x.numel(), dtype=DT).reshape(shape) + 1.0


@pytest.mark.parametrize("name,adapter,make,shape", CASES, ids=[c[0] for c in CASES])
def test_statistics_match_hand_formula(name, adapter, make, shape):
    m = make().double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    x = _data(shape, CASES.index(next(c for c in CASES if c[0] == name)))
    out = m(x)
    s = torch.randn_like(out)
    xh, dims = by_hand(m, x)
    # the layer really is y = w·x̂ + b with this x̂ (checks the hand formula itself)
    wshape = [1] * x.dim()
    feat = [d for d in range(x.dim()) if d not in dims]
    for d in feat:
        wshape[d] = x.shape[d]
    w = m.weight.reshape(wshape)
    b = m.bias.reshape(wshape) if getattr(m, "bias", None) is not None else 0.0
    torch.testing.assert_close(out, w * xh + b, rtol=1e-10, atol=1e-12)

    H = adapter.input_diagonal(m, x, out, DT)
    S = adapter.output_diagonal(m, s, DT)
    R = 1
    for d in dims:
        R *= x.shape[d]
    assert H.count == S.count == R
    want_H = (xh**2).mean(dims).reshape(m.weight.shape)
    want_S = (s**2).mean(dims).reshape(m.weight.shape)
    torch.testing.assert_close(H.total / H.count, want_H, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(S.total / S.count, want_S, rtol=1e-10, atol=0)

    curv = adapter.curvature(m, want_H, want_S)
    torch.testing.assert_close(curv["weight"], want_H * want_S, rtol=0, atol=0)
    if getattr(m, "bias", None) is not None:
        torch.testing.assert_close(curv["bias"], want_S, rtol=0, atol=0)
        assert set(adapter.parameters(m)) == {"weight", "bias"}
    else:
        assert "bias" not in curv and set(adapter.parameters(m)) == {"weight"}


def test_batchnorm_h_is_one_minus_eps_over_var():
    """For BatchNorm, mean x̂² = var/(var + eps) exactly: H is ≈ 1 for every channel."""
    m = nn.BatchNorm2d(3).double()
    x = _data((5, 3, 2, 2), 7)
    H = BatchNormAdapter().input_diagonal(m, x, m(x), DT)
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(H.total / H.count, var / (var + m.eps), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "adapter,module,shape",
    [
        (LayerNormAdapter(), nn.LayerNorm(4), (1, 4)),
        (LayerNormAdapter(), nn.LayerNorm((2, 3)), (1, 2, 3)),
        (GroupNormAdapter(), nn.GroupNorm(2, 4), (1, 4)),
        (RMSNormAdapter(), nn.RMSNorm(4), (1, 4)),
    ],
    ids=["ln", "ln_2d_shape", "gn", "rms"],
)
def test_curvature_is_squared_per_example_gradient_for_one_row(adapter, module, shape):
    """With one row per feature (one sample, no positions) the affine gradient is s·x̂ (weight)
    and s (bias), so its square is exactly curvature(H, S)."""
    m = module.double()
    x = torch.randn(*shape, dtype=DT) * 2 + 0.5
    out = m(x)
    s = torch.randn_like(out)
    params = adapter.parameters(m)
    grads = torch.autograd.grad(out, list(params.values()), s)
    H = adapter.input_diagonal(m, x, out, DT)
    S = adapter.output_diagonal(m, s, DT)
    assert H.count == S.count == 1
    curv = adapter.curvature(m, H.total, S.total)
    for (role, _), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(curv[role], g**2, rtol=1e-10, atol=1e-14)


def test_non_affine_layers_own_no_parameters():
    assert BatchNormAdapter().parameters(nn.BatchNorm2d(3, affine=False)) == {}
    assert LayerNormAdapter().parameters(nn.LayerNorm(3, elementwise_affine=False)) == {}
    assert GroupNormAdapter().parameters(nn.GroupNorm(1, 3, affine=False)) == {}
