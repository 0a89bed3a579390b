"""ConvolutionAdapter (Conv1d / Conv2d / Conv3d) vs independent computations (float64, 1e-10).

Ground truths, none of which uses the adapter's code:

* **basis patches** — a convolution of the same class with one-hot ("basis") filters and the
  module's own stride / padding / padding_mode / dilation / groups: its output channel
  ``k·D + i`` *is* patch entry ``i`` of group ``k`` at every output position, however torch pads;
* **a loop over output positions** on an input padded by ``F.pad`` (zero padding), slicing each
  window by hand;
* **the module itself**: the rows times the weight's matrix view reproduce ``module(x)``, and the
  per-row products ``Σ_t g_t ā_tᵀ`` reproduce autograd's ``∂L/∂W`` and ``∂L/∂b``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.plugins.adapters.conv2d import Conv2dAdapter
from curvlab.plugins.adapters.convolution import ConvolutionAdapter, window_sums
from curvlab.plugins.estimators.full import FullEstimator

DT = torch.float64
ADAPTER = ConvolutionAdapter()
CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

CASES = {
    "1d_k3": dict(rank=1, in_channels=3, out_channels=4, kernel_size=3),
    "1d_stride2_pad2_dil2_groups2": dict(
        rank=1,
        in_channels=4,
        out_channels=6,
        kernel_size=3,
        stride=2,
        padding=2,
        dilation=2,
        groups=2,
    ),
    "1d_same_even_no_bias": dict(
        rank=1, in_channels=2, out_channels=3, kernel_size=4, padding="same", bias=False
    ),
    "1d_same_dilated_reflect": dict(
        rank=1,
        in_channels=2,
        out_channels=2,
        kernel_size=2,
        dilation=3,
        padding="same",
        padding_mode="reflect",
    ),
    "1d_circular_groups": dict(
        rank=1,
        in_channels=4,
        out_channels=4,
        kernel_size=3,
        padding=1,
        padding_mode="circular",
        groups=4,
    ),
    "1d_replicate_valid": dict(
        rank=1,
        in_channels=2,
        out_channels=3,
        kernel_size=2,
        padding="valid",
        stride=3,
        padding_mode="replicate",
    ),
    "2d_rect": dict(
        rank=2, in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(2, 1), stride=(1, 2)
    ),
    "3d_k2": dict(rank=3, in_channels=2, out_channels=3, kernel_size=2),
    "3d_mixed": dict(
        rank=3,
        in_channels=4,
        out_channels=2,
        kernel_size=(3, 1, 2),
        stride=(2, 1, 1),
        padding=(1, 0, 1),
        dilation=(1, 1, 2),
        groups=2,
    ),
    "3d_same_replicate": dict(
        rank=3,
        in_channels=2,
        out_channels=2,
        kernel_size=(2, 3, 1),
        padding="same",
        padding_mode="replicate",
        bias=False,
    ),
    "3d_reflect_strided": dict(
        rank=3,
        in_channels=3,
        out_channels=3,
        kernel_size=3,
        padding=1,
        stride=2,
        padding_mode="reflect",
        groups=3,
    ),
    "3d_circular": dict(
        rank=3,
        in_channels=1,
        out_channels=2,
        kernel_size=(1, 2, 3),
        padding=(0, 1, 1),
        padding_mode="circular",
    ),
}
SIDES = {1: (9,), 2: (7, 6), 3: (5, 4, 6)}


def make(spec: dict) -> nn.Module:
    spec = dict(spec)
    return CLASSES[spec.pop("rank")](**spec).double()


def inputs(m: nn.Module, batched: bool = True, n: int = 3, side=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    side = side or SIDES[len(m.kernel_size)]
    shape = (n, m.in_channels, *side) if batched else (m.in_channels, *side)
    return torch.randn(*shape, generator=gen, dtype=DT) + 0.2


def basis_patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, N·L, D) patches, rows (sample, position), via one-hot filters."""
    rank = len(m.kernel_size)
    x = x if x.dim() == rank + 2 else x[None]
    G = m.groups
    cin_g = m.in_channels // G
    D = cin_g * math.prod(m.kernel_size)
    probe = type(m)(
        m.in_channels,
        G * D,
        m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=G,
        bias=False,
        padding_mode=m.padding_mode,
    ).double()
    with torch.no_grad():
        eye = torch.eye(D, dtype=DT).reshape(D, cin_g, *m.kernel_size)
        probe.weight.copy_(eye.repeat(G, *([1] * (rank + 1))))
        out = probe(x)  # (N, G·D, *T)
    n, L = out.shape[0], math.prod(out.shape[2:])
    return out.reshape(n, G, D, L).permute(1, 0, 3, 2).reshape(G, n * L, D)


def loop_patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Zero padding only: pad, then slice every window at every output position by hand."""
    rank = len(m.kernel_size)
    pads = []
    for p in reversed(m.padding):
        pads += [p, p]
    xp = F.pad(x, pads)
    k, s, d = m.kernel_size, m.stride, m.dilation
    out = [(xp.shape[2 + a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(rank)]
    rows = []
    for n in range(x.shape[0]):
        for t in itertools.product(*map(range, out)):
            window = xp[n][(slice(None), *(slice(t[a] * s[a], None) for a in range(rank)))]
            window = window[
                (slice(None), *(slice(None, d[a] * (k[a] - 1) + 1, d[a]) for a in range(rank)))
            ]
            rows.append(window.reshape(-1))
    rows = torch.stack(rows)  # (N·L, C·K), channel-major
    G = m.groups
    return rows.reshape(rows.shape[0], G, -1).transpose(0, 1)


def with_ones(rows: torch.Tensor, m: nn.Module) -> torch.Tensor:
    if m.bias is None:
        return rows
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], -1)


def grouped(out: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """(N, C_out, *T) → (groups, N·L, C_out/groups), rows (sample, position)."""
    rank = len(m.kernel_size)
    out = out if out.dim() == rank + 2 else out[None]
    rows = out.movedim(1, -1).reshape(-1, out.shape[1])
    return rows.reshape(rows.shape[0], m.groups, -1).transpose(0, 1)


def check_against_module(adapter, m: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows times the weight's matrix view give the module's output; Σ_t g_t ā_tᵀ gives its
    gradient (for a random output gradient)."""
    params = adapter.parameters(m)
    out = m(x)
    W = adapter.to_matrix(m, {r: p.detach() for r, p in params.items()})  # (G, o, D[+1])
    z = rows @ W.transpose(1, 2)  # the bias enters through the ones column
    torch.testing.assert_close(z, grouped(out.detach(), m), rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(params.values()), g)
    want = adapter.to_matrix(m, dict(zip(params, grads, strict=True)))
    got = grouped(g, m).transpose(1, 2) @ rows  # (G, o, D[+1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    back = adapter.from_matrix(m, got)
    for role, gr in zip(params, grads, strict=True):
        torch.testing.assert_close(back[role], gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(CASES))
def test_rows_and_diagonal_equal_basis_patches(name, batched):
    m = make(CASES[name])
    x = inputs(m, batched)
    out = m(x)
    want = with_ones(basis_patches(m, x), m)  # (G, N·L, D[+1])
    rows = ADAPTER.input_rows(m, x)
    assert rows.shape == want.shape
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    n = x.shape[0] if batched else 1
    assert stat.count == n * math.prod(out.shape[-len(m.kernel_size) :]) == want.shape[1]
    assert stat.total.dtype == DT
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)
    check_against_module(ADAPTER, m, x, rows)


@pytest.mark.parametrize(
    "name",
    [
        k
        for k, v in CASES.items()
        if not isinstance(v.get("padding", 0), str) and v.get("padding_mode", "zeros") == "zeros"
    ],
)
def test_basis_patches_agree_with_a_loop_over_windows(name):
    """The two ground truths coincide where zero padding is explicit."""
    m = make(CASES[name])
    x = inputs(m)
    torch.testing.assert_close(basis_patches(m, x), loop_patches(m, x), rtol=0, atol=0)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", ["1d_stride2_pad2_dil2_groups2", "3d_mixed", "3d_k2"])
def test_output_statistics_and_full_factors(name, batched):
    m = make(CASES[name])
    x = inputs(m, batched)
    out = m(x)
    g = torch.randn_like(out)
    stat = ADAPTER.output_diagonal(m, g, DT)
    rows_g = grouped(g, m)  # (G, R, o)
    R = rows_g.shape[1]
    assert stat.count == R
    torch.testing.assert_close(
        stat.total / stat.count, (rows_g**2).mean(1).reshape(-1), rtol=1e-10, atol=0
    )
    assert ADAPTER.batch_size(m, g) == (x.shape[0] if batched else 1)
    # full K-FAC factors through the estimator: A = mean ā āᵀ, G = mean g gᵀ per group
    est = FullEstimator(per_sample=False)
    A = est.input_statistic(ADAPTER, m, x, out, DT)
    G = est.output_statistic(ADAPTER, m, g, DT)
    patches = with_ones(basis_patches(m, x), m)
    torch.testing.assert_close(
        A.total / A.count, patches.transpose(1, 2) @ patches / R, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        G.total / G.count, rows_g.transpose(1, 2) @ rows_g / R, rtol=1e-10, atol=1e-12
    )


def test_window_sums_is_the_product_selection():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 4, 5, 3, generator=gen, dtype=DT)
    sels = [torch.randint(0, 2, (k, p), generator=gen).to(DT) for k, p in ((2, 4), (3, 5), (2, 3))]
    want = torch.einsum("cxyz,ix,jy,kz->cijk", image, *sels)
    torch.testing.assert_close(window_sums(image, sels), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        window_sums(image[:, 0, 0], sels[2:]), image[:, 0, 0] @ sels[2].T, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", ["1d_stride2_pad2_dil2_groups2", "3d_mixed", "3d_reflect_strided"])
def test_diagonal_does_not_unfold_or_gather_the_batch(name, monkeypatch):
    """H comes from Σ_n x² (one image) and the per-axis selection matmuls: no unfold, no row
    gather."""
    import curvlab.plugins.adapters.convolution as conv

    calls = []
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: calls.append("unfold"))
    monkeypatch.setattr(conv, "gather_rows", lambda *a, **k: calls.append("gather"))
    m = make(CASES[name])
    x = inputs(m, n=5)
    stat = ADAPTER.input_diagonal(m, x, m(x), DT)
    assert calls == []
    want = with_ones(basis_patches(m, x), m)
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["1d_k3", "1d_stride2_pad2_dil2_groups2", "3d_mixed"])
def test_curvature_layout_equals_squared_per_example_gradient(name):
    """One sample, one output position: the gradient is g ⊗ ā, its square is curvature(H, S)."""
    m = make(CASES[name])
    k, d = m.kernel_size, m.dilation
    pads = m.padding if not isinstance(m.padding, str) else (0,) * len(k)
    side = tuple(max(d[a] * (k[a] - 1) + 1 - 2 * pads[a], 1) for a in range(len(k)))
    x = torch.randn(1, m.in_channels, *side, dtype=DT)
    out = m(x)
    assert math.prod(out.shape[2:]) == 1
    g = torch.randn_like(out)
    params = ADAPTER.parameters(m)
    grads = torch.autograd.grad(out, list(params.values()), g)
    H, S = ADAPTER.input_diagonal(m, x, out, DT), ADAPTER.output_diagonal(m, g, DT)
    assert H.count == S.count == 1
    curv = ADAPTER.curvature(m, H.total, S.total)
    for role, gr in zip(params, grads, strict=True):
        torch.testing.assert_close(curv[role], gr**2, rtol=1e-12, atol=1e-14)


def test_conv2d_adapter_is_the_same_statistic():
    """The legacy "conv2d" adapter is ConvolutionAdapter restricted to Conv2d."""
    m = make(CASES["2d_rect"])
    x = inputs(m)
    out = m(x)
    legacy = Conv2dAdapter()
    assert legacy.matches(m) and not legacy.matches(nn.Conv1d(1, 1, 1))
    assert ADAPTER.matches(nn.Conv1d(1, 1, 1)) and ADAPTER.matches(nn.Conv3d(1, 1, 1))
    assert not ADAPTER.matches(nn.ConvTranspose2d(1, 1, 1))
    a, b = legacy.input_diagonal(m, x, out, DT), ADAPTER.input_diagonal(m, x, out, DT)
    assert torch.equal(a.total, b.total) and a.count == b.count
    assert torch.equal(legacy.input_rows(m, x), ADAPTER.input_rows(m, x))


# -- random configurations -----------------------------------------------------------------------
@st.composite
def conv_specs(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans())
    stride = (1,) * rank if same else tuple(draw(st.integers(1, 3)) for _ in range(rank))
    padding = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(rank))
    side = tuple(draw(st.integers(5, 7 if rank < 3 else 5)) for _ in range(rank))
    return dict(
        spec=dict(
            rank=rank,
            in_channels=groups * draw(st.integers(1, 2)),
            out_channels=groups * draw(st.integers(1, 2)),
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
            bias=draw(st.booleans()),
        ),
        side=side,
        batched=draw(st.booleans()),
        seed=draw(st.integers(0, 1000)),
    )


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(conv_specs())
def test_random_configurations(case):
    m = make(case["spec"])
    x = inputs(m, case["batched"], n=2, side=case["side"], seed=case["seed"])
    out = m(x)
    want = with_ones(basis_patches(m, x), m)
    rows = ADAPTER.input_rows(m, x)
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)
    check_against_module(ADAPTER, m, x, rows)
