"""ConvTransposeAdapter (ConvTranspose1d/2d/3d) vs independent computations (float64, 1e-10).

Ground truths, none of which uses the adapter's code:

* **the definition** — a loop over output positions t and kernel offsets i: ``ā_t[c, i] =
  x[c, j]`` for the input position j with ``j·s + i·d − p = t`` on every axis, else 0;
* **basis rows** — a transposed convolution with ``groups = C_in`` and one-hot kernels: its
  output channel ``c·K + i`` is ``ā[c, i]`` at every output position (torch's own semantics,
  output_padding included);
* **the equivalence** ``conv_transpose(x, W) = conv(zero-inserted, padded x, flipped W)``, which
  makes the definition's rows the patches of a plain convolution (checked against
  ``F.conv_nd``);
* **the module itself**: rows times the weight's matrix view give ``module(x)``, and
  ``Σ_t g_t ā_tᵀ`` gives autograd's weight and bias gradients.
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

from curvlab.plugins.adapters.conv_transpose import ConvTransposeAdapter
from curvlab.plugins.estimators.banded import BandedEstimator
from curvlab.plugins.estimators.full import FullEstimator

DT = torch.float64
ADAPTER = ConvTransposeAdapter()
CLASSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CASES = {
    "1d_k3": dict(rank=1, in_channels=3, out_channels=4, kernel_size=3),
    "1d_s2_p1_op1": dict(
        rank=1,
        in_channels=2,
        out_channels=3,
        kernel_size=3,
        stride=2,
        padding=1,
        output_padding=1,
    ),
    "1d_dil2_groups2_no_bias": dict(
        rank=1,
        in_channels=4,
        out_channels=6,
        kernel_size=3,
        dilation=2,
        padding=2,
        groups=2,
        bias=False,
    ),
    "1d_s3_k2_p2_op2": dict(
        rank=1,
        in_channels=2,
        out_channels=2,
        kernel_size=2,
        stride=3,
        padding=2,
        output_padding=2,
    ),
    "2d_unet_up": dict(rank=2, in_channels=4, out_channels=2, kernel_size=2, stride=2),
    "2d_mixed": dict(
        rank=2,
        in_channels=4,
        out_channels=4,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        output_padding=(1, 0),
        dilation=(1, 2),
        groups=2,
    ),
    "2d_dil_op": dict(
        rank=2,
        in_channels=2,
        out_channels=3,
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=2,
        output_padding=1,
    ),
    "3d_k2_s2": dict(rank=3, in_channels=2, out_channels=2, kernel_size=2, stride=2),
    "3d_mixed": dict(
        rank=3,
        in_channels=2,
        out_channels=4,
        kernel_size=(2, 3, 1),
        stride=(1, 2, 2),
        padding=(0, 1, 0),
        output_padding=(0, 1, 1),
        groups=2,
    ),
}
SIDES = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}


def make(spec: dict) -> nn.Module:
    spec = dict(spec)
    return CLASSES[spec.pop("rank")](**spec).double()


def inputs(m: nn.Module, batched: bool = True, n: int = 3, side=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    side = side or SIDES[len(m.kernel_size)]
    shape = (n, m.in_channels, *side) if batched else (m.in_channels, *side)
    return torch.randn(*shape, generator=gen, dtype=DT) + 0.2


def definition_rows(m: nn.Module, x: torch.Tensor, out_size=None) -> torch.Tensor:
    """(groups, N·T, C_in/groups·K) from the definition, by loops."""
    rank = len(m.kernel_size)
    x = x if x.dim() == rank + 2 else x[None]
    n, c = x.shape[:2]
    k, s, d, p = m.kernel_size, m.stride, m.dilation, m.padding
    if out_size is None:
        out_size = [
            (x.shape[2 + a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + m.output_padding[a] + 1
            for a in range(rank)
        ]
    T = math.prod(out_size)
    K = math.prod(k)
    rows = torch.zeros(n, T, c, K, dtype=x.dtype)
    for ti, t in enumerate(itertools.product(*map(range, out_size))):
        for ii, i in enumerate(itertools.product(*map(range, k))):
            j = []
            for a in range(rank):
                u = t[a] + p[a] - i[a] * d[a]
                if u % s[a] or not 0 <= u // s[a] < x.shape[2 + a]:
                    break
                j.append(u // s[a])
            else:
                rows[:, ti, :, ii] = x[(slice(None), slice(None), *j)]
    G = m.groups
    return rows.reshape(n * T, G, -1).transpose(0, 1)


def basis_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows via a one-hot transposed convolution (groups = C_in)."""
    rank = len(m.kernel_size)
    x = x if x.dim() == rank + 2 else x[None]
    c, K = m.in_channels, math.prod(m.kernel_size)
    probe = type(m)(
        c,
        c * K,
        m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        output_padding=m.output_padding,
        groups=c,
        bias=False,
        dilation=m.dilation,
    ).double()
    with torch.no_grad():
        probe.weight.copy_(
            torch.eye(K, dtype=DT).reshape(1, K, *m.kernel_size).repeat(c, *([1] * (rank + 1)))
        )
        out = probe(x)  # (N, C·K, *T): channel c·K + i = ā[c, i]
    n, L = out.shape[0], math.prod(out.shape[2:])
    rows = out.reshape(n, c * K, L).transpose(1, 2).reshape(n * L, m.groups, -1)
    return rows.transpose(0, 1)


def with_ones(rows, m):
    if m.bias is None:
        return rows
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], -1)


def grouped(out: torch.Tensor, m: nn.Module) -> torch.Tensor:
    rank = len(m.kernel_size)
    out = out if out.dim() == rank + 2 else out[None]
    rows = out.movedim(1, -1).reshape(-1, out.shape[1])
    return rows.reshape(rows.shape[0], m.groups, -1).transpose(0, 1)


def check_against_module(m: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> None:
    """rows · W = module(x); Σ_t g_t ā_tᵀ = autograd's gradient (and from_matrix inverts)."""
    params = ADAPTER.parameters(m)
    out = m(x)
    W = ADAPTER.to_matrix(m, {r: p.detach() for r, p in params.items()})  # (G, o, D[+1])
    torch.testing.assert_close(
        rows @ W.transpose(1, 2), grouped(out.detach(), m), rtol=1e-10, atol=1e-12
    )
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(params.values()), g)
    got = grouped(g, m).transpose(1, 2) @ rows
    torch.testing.assert_close(
        got, ADAPTER.to_matrix(m, dict(zip(params, grads, strict=True))), rtol=1e-10, atol=1e-12
    )
    back = ADAPTER.from_matrix(m, got)
    for role, gr in zip(params, grads, strict=True):
        torch.testing.assert_close(back[role], gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(CASES))
def test_rows_and_diagonal_equal_the_definition(name, batched):
    m = make(CASES[name])
    x = inputs(m, batched)
    out = m(x)
    want = with_ones(definition_rows(m, x), m)
    torch.testing.assert_close(with_ones(basis_rows(m, x), m), want, rtol=0, atol=0)
    rows = ADAPTER.input_rows(m, x)
    assert rows.shape == want.shape
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    n = x.shape[0] if batched else 1
    assert stat.count == n * math.prod(out.shape[-len(m.kernel_size) :]) == want.shape[1]
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)
    check_against_module(m, x, rows)


@pytest.mark.parametrize("name", list(CASES))
def test_definition_is_a_convolution_of_the_zero_inserted_input(name):
    """conv_transpose(x, W) = conv(x↑s padded by d(k−1)−p (right: + output_padding), W flipped
    and with in/out channels swapped, dilation d): the definition's rows, times W, equal it."""
    m = make(CASES[name])
    x = inputs(m)
    rank = len(m.kernel_size)
    k, s, d, p, op = m.kernel_size, m.stride, m.dilation, m.padding, m.output_padding
    up = x.new_zeros(*x.shape[:2], *((x.shape[2 + a] - 1) * s[a] + 1 for a in range(rank)))
    up[(slice(None), slice(None), *(slice(None, None, s[a]) for a in range(rank)))] = x
    pads = []
    for a in reversed(range(rank)):
        edge = d[a] * (k[a] - 1) - p[a]
        pads += [edge, edge + op[a]]
    up = F.pad(up, pads)  # negative entries crop
    G = m.groups
    w = m.weight.detach()  # (C_in, o, k…) → (C_out, C_in/G, k…), flipped
    w = w.reshape(G, -1, *w.shape[1:]).transpose(1, 2).reshape(-1, w.shape[0] // G, *k)
    w = w.flip(list(range(2, 2 + rank)))
    want = CONV[rank](up, w, m.bias, dilation=d, groups=G)
    torch.testing.assert_close(m(x).detach(), want, rtol=1e-10, atol=1e-12)
    W = ADAPTER.to_matrix(m, {r: q.detach() for r, q in ADAPTER.parameters(m).items()})
    z = with_ones(definition_rows(m, x), m) @ W.transpose(1, 2)
    torch.testing.assert_close(z, grouped(want, m), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["1d_s2_p1_op1", "2d_mixed", "3d_mixed"])
def test_output_statistics_and_full_factors(name):
    m = make(CASES[name])
    x = inputs(m)
    out = m(x)
    g = torch.randn_like(out)
    rows_g = grouped(g, m)
    R = rows_g.shape[1]
    stat = ADAPTER.output_diagonal(m, g, DT)
    assert stat.count == R
    torch.testing.assert_close(
        stat.total / stat.count, (rows_g**2).mean(1).reshape(-1), rtol=1e-10, atol=0
    )
    rows = with_ones(definition_rows(m, x), m)
    A_want = rows.transpose(1, 2) @ rows / R
    G_want = rows_g.transpose(1, 2) @ rows_g / R
    full = FullEstimator(per_sample=False)
    A, G = full.input_statistic(ADAPTER, m, x, out, DT), full.output_statistic(ADAPTER, m, g, DT)
    torch.testing.assert_close(A.total / A.count, A_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.total / G.count, G_want, rtol=1e-10, atol=1e-12)
    banded = BandedEstimator(bandwidth=1, per_sample=False)
    band = banded.input_statistic(ADAPTER, m, x, out, DT)
    i = torch.arange(A_want.shape[-1])
    torch.testing.assert_close(
        band.total[:, 1, :-1] / band.count, A_want[:, i[:-1], i[1:]], rtol=1e-10, atol=1e-12
    )


def test_diagonal_needs_no_rows(monkeypatch):
    """H from Σ_n x² and per-axis selection matmuls: no row gather, no zero insertion."""
    import curvlab.plugins.adapters.conv_transpose as ct

    calls = []
    monkeypatch.setattr(ct, "gather_rows", lambda *a, **k: calls.append("gather"))
    m = make(CASES["3d_mixed"])
    x = inputs(m, n=4)
    stat = ADAPTER.input_diagonal(m, x, m(x), DT)
    assert calls == []
    want = with_ones(definition_rows(m, x), m)
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)


def test_forward_with_output_size():
    """``forward(x, output_size=…)`` picks another output_padding: the diagonal statistic reads
    the real output; the rows (built from module.output_padding) refuse clearly."""
    m = make(CASES["2d_unet_up"])  # stride 2: output_padding 0 or 1 per axis
    x = inputs(m)
    out = m(x, output_size=[9, 7])
    assert out.shape[-2:] == (9, 7)
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    want = with_ones(definition_rows(m, x, out_size=(9, 7)), m)
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"output_padding=\(0, 0\).*output_size="):
        ADAPTER.output_rows(m, torch.randn_like(out))
    assert ADAPTER.output_rows(m, torch.randn_like(m(x))).shape == (3 * 8 * 6, 2)


@pytest.mark.parametrize("name", ["1d_k3", "2d_mixed", "3d_mixed"])
def test_curvature_layout(name):
    """F_W[c, o, i] = S[o]·H[k(c), c mod C_in/g, i] and F_b[o] = S[o]·H[k(o), −1] in the
    (C_in, C_out/g, k…) weight layout, checked entry by entry."""
    m = make(CASES[name])
    G = m.groups
    c_g, o_g, K = m.in_channels // G, m.out_channels // G, math.prod(m.kernel_size)
    D = c_g * K + (m.bias is not None)
    H = torch.rand(G, D, dtype=DT)
    S = torch.rand(m.out_channels, dtype=DT)
    curv = ADAPTER.curvature(m, H, S)
    assert curv["weight"].shape == m.weight.shape
    w = curv["weight"].reshape(m.in_channels, o_g, K)
    for c in range(m.in_channels):
        k = c // c_g
        for o in range(o_g):
            for i in range(K):
                assert w[c, o, i] == S[k * o_g + o] * H[k, (c % c_g) * K + i]
    if m.bias is not None:
        for o in range(m.out_channels):
            assert curv["bias"][o] == S[o] * H[o // o_g, -1]


@pytest.mark.parametrize("name", ["1d_k3", "2d_mixed", "3d_k2_s2"])
def test_curvature_equals_squared_gradient_of_one_row(name):
    """With one sample and a single nonzero output gradient entry (one row), the gradient is
    g ⊗ ā_t and its square is curvature(H, S) built from that row."""
    m = make(CASES[name])
    x = inputs(m, n=1)
    out = m(x)
    g = torch.zeros_like(out)
    index = (0, slice(None), *(s // 2 for s in out.shape[2:]))
    g[index] = torch.randn(out.shape[1], dtype=DT)
    params = ADAPTER.parameters(m)
    grads = torch.autograd.grad(out, list(params.values()), g)
    rows = ADAPTER.input_rows(m, x)  # (G, T, D[+1])
    t = torch.arange(math.prod(out.shape[2:])).reshape(out.shape[2:])[index[2:]].item()
    H = rows[:, t] ** 2
    S = g[index] ** 2
    curv = ADAPTER.curvature(m, H, S)
    for role, gr in zip(params, grads, strict=True):
        torch.testing.assert_close(curv[role], gr**2, rtol=1e-12, atol=1e-14)


# -- random configurations -----------------------------------------------------------------------
@st.composite
def transpose_specs(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(rank))
    output_padding = tuple(
        draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
    )
    side = tuple(draw(st.integers(2, 4 if rank < 3 else 3)) for _ in range(rank))
    return dict(
        spec=dict(
            rank=rank,
            in_channels=groups * draw(st.integers(1, 2)),
            out_channels=groups * draw(st.integers(1, 2)),
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
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
@given(transpose_specs())
def test_random_configurations(case):
    m = make(case["spec"])
    x = inputs(m, case["batched"], n=2, side=case["side"], seed=case["seed"])
    try:
        out = m(x)
    except RuntimeError:  # padding larger than the output: torch refuses the geometry
        return
    if out.numel() == 0:
        return
    want = with_ones(definition_rows(m, x), m)
    rows = ADAPTER.input_rows(m, x)
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    torch.testing.assert_close(stat.total / stat.count, (want**2).mean(1), rtol=1e-10, atol=1e-12)
    check_against_module(m, x, rows)


def test_kfac_step_is_the_kronecker_solve_in_the_transposed_layout():
    """A full-K-FAC step on a grouped ConvTranspose2d equals −(G_k ⊗ A_k + λI)⁻¹ vec(V_k) per
    group, with A, G from the definition's rows and V_k[o, (c, i)] = ∂L/∂W[k·C_in/G + c, o, i]
    (bias as the last column) written out here by hand: the optimizer's eigenbasis solve goes
    through to_matrix / from_matrix."""
    import curvlab

    torch.manual_seed(0)
    m = make(CASES["2d_mixed"])  # groups 2, stride, padding, output_padding, dilation, bias
    x = inputs(m, n=4)
    lam = 1e-2
    opt = curvlab.CurvatureOptimizer(
        m,
        lr=1.0,
        beta=0.0,
        gamma=0.0,
        estimator=curvlab.registry.create("estimators", "full", per_sample=False),
        normalizer="identity",
        damping=lam,
        update_rule="kfac",
    )
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    grads = {"weight": m.weight.grad.clone(), "bias": m.bias.grad.clone()}
    before = {"weight": m.weight.detach().clone(), "bias": m.bias.detach().clone()}
    opt.step()

    G_ = m.groups
    c_g, o_g = m.in_channels // G_, m.out_channels // G_
    K = math.prod(m.kernel_size)
    rows = with_ones(definition_rows(m, x), m)  # (G, R, D+1)
    rows_g = grouped(g, m)
    R = rows.shape[1]
    for k in range(G_):
        A = rows[k].T @ rows[k] / R
        Gk = rows_g[k].T @ rows_g[k] / R
        V = torch.zeros(o_g, c_g * K + 1, dtype=DT)
        for o in range(o_g):
            for c in range(c_g):
                V[o, c * K : (c + 1) * K] = grads["weight"][k * c_g + c, o].reshape(-1)
            V[o, -1] = grads["bias"][k * o_g + o]
        F_ = torch.kron(Gk, A) + lam * torch.eye(V.numel(), dtype=DT)
        step = torch.linalg.solve(F_, V.reshape(-1)).reshape(V.shape)
        for o in range(o_g):
            for c in range(c_g):
                moved = before["weight"][k * c_g + c, o] - m.weight[k * c_g + c, o].detach()
                torch.testing.assert_close(
                    moved.reshape(-1), step[o, c * K : (c + 1) * K], rtol=1e-8, atol=1e-10
                )
            moved_b = before["bias"][k * o_g + o] - m.bias[k * o_g + o].detach()
            torch.testing.assert_close(moved_b, step[o, -1], rtol=1e-8, atol=1e-10)
