"""Conv2dAdapter statistics vs the straightforward im2col formula (float64, 1e-10).

Ground truth for the patches: a convolution with one-hot ("basis") filters and the module's own
stride / padding / padding_mode / dilation / groups — its output channel ``k·D + i`` *is* patch
entry ``i`` of group ``k`` at every output position, however torch pads. For zero padding the
same patches also come from ``F.unfold`` of the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.plugins.adapters.conv2d import Conv2dAdapter

DT = torch.float64
ADAPTER = Conv2dAdapter()
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = {
    "k3": dict(in_channels=3, out_channels=4, kernel_size=3),
    "k3_pad1_bias_off": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),
    "stride2_pad1_dil2_groups2": dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2
    ),
    "rect_kernel_tuple_pad": dict(
        in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(2, 1), stride=(1, 2)
    ),
    "same_even_kernel": dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same"),
    "same_dilated": dict(
        in_channels=2, out_channels=2, kernel_size=3, padding="same", dilation=(2, 1)
    ),
    "valid": dict(in_channels=3, out_channels=2, kernel_size=2, padding="valid", stride=2),
    "reflect": dict(
        in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"
    ),
    "circular": dict(
        in_channels=2,
        out_channels=4,
        kernel_size=3,
        padding=(1, 2),
        padding_mode="circular",
        groups=2,
    ),
    "replicate_strided": dict(
        in_channels=2, out_channels=2, kernel_size=3, padding=2, stride=2, padding_mode="replicate"
    ),
    "same_reflect_even": dict(
        in_channels=2, out_channels=2, kernel_size=(4, 2), padding="same", padding_mode="reflect"
    ),
    "groups3_1x1_no_bias": dict(in_channels=6, out_channels=3, kernel_size=1, groups=3, bias=False),
    "depthwise": dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3),
}


def make(name):
    return nn.Conv2d(**CASES[name]).double()


def basis_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(groups, N·L, D) patches, rows ordered (sample, position), via one-hot filters."""
    x = x if x.dim() == 4 else x[None]
    G = m.groups
    cin_g = m.in_channels // G
    kh, kw = m.kernel_size
    D = cin_g * kh * kw
    probe = nn.Conv2d(
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
        eye = torch.eye(D, dtype=DT).reshape(D, cin_g, kh, kw)
        probe.weight.copy_(eye.repeat(G, 1, 1, 1))
        out = probe(x)  # (N, G·D, Ho, Wo)
    n, _, ho, wo = out.shape
    return out.reshape(n, G, D, ho * wo).permute(1, 0, 3, 2).reshape(G, n * ho * wo, D)


def with_ones(rows, m):
    if m.bias is None:
        return rows
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], -1)


def inputs(name, batched=True, n=3, side=(7, 6)):
    gen = torch.Generator().manual_seed(list(CASES).index(name))
    cin = CASES[name]["in_channels"]
    shape = (n, cin, *side) if batched else (cin, *side)
    return torch.randn(*shape, generator=gen, dtype=DT) + 0.2


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(CASES))
def test_input_diagonal_is_mean_of_squared_patches(name, batched):
    m = make(name)
    x = inputs(name, batched)
    out = m(x)
    rows = with_ones(basis_patches(m, x), m)  # (G, N·L, D[+1])
    stat = ADAPTER.input_diagonal(m, x, out, DT)
    n = x.shape[0] if batched else 1
    L = out.shape[-1] * out.shape[-2]
    assert stat.count == n * L == rows.shape[1]
    assert stat.total.dtype == DT
    torch.testing.assert_close(stat.total / stat.count, (rows**2).mean(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        k
        for k, v in CASES.items()
        if not isinstance(v.get("padding", 0), str) and v.get("padding_mode", "zeros") == "zeros"
    ],
)
def test_basis_patches_agree_with_unfold(name):
    """The two ground truths coincide where F.unfold applies (int/tuple zero padding)."""
    m = make(name)
    x = inputs(name)
    patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    n, d, L = patches.shape
    G = m.groups
    rows = patches.reshape(n, G, d // G, L).permute(1, 0, 3, 2).reshape(G, n * L, d // G)
    torch.testing.assert_close(rows, basis_patches(m, x), rtol=0, atol=0)
    stat = ADAPTER.input_diagonal(m, x, m(x), DT)
    torch.testing.assert_close(
        stat.total / stat.count, (with_ones(rows, m) ** 2).mean(1), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(CASES))
def test_input_rows_are_patches_per_group(name, batched):
    m = make(name)
    x = inputs(name, batched)
    rows = ADAPTER.input_rows(m, x)
    want = with_ones(basis_patches(m, x), m)
    assert rows.shape == want.shape
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize(
    "name", ["k3", "stride2_pad1_dil2_groups2", "same_even_kernel", "circular"]
)
def test_output_statistics(name, batched):
    m = make(name)
    x = inputs(name, batched)
    out = m(x)
    g = torch.randn_like(out)
    stat = ADAPTER.output_diagonal(m, g, DT)
    gb = g if batched else g[None]
    n, c, ho, wo = gb.shape
    assert stat.count == n * ho * wo
    want = torch.stack([(gb[:, o] ** 2).mean() for o in range(c)])
    torch.testing.assert_close(stat.total / stat.count, want, rtol=1e-10, atol=0)
    rows = ADAPTER.output_rows(
        m, g
    )  # (N·L, C_out), rows ordered (sample, position) like input_rows
    assert rows.shape == (n * ho * wo, c)
    for o in range(c):
        torch.testing.assert_close(rows[:, o], gb[:, o].reshape(-1), rtol=0, atol=0)


def test_fast_path_does_not_unfold(monkeypatch):
    """H is built from Σ_n x² (one image) and two 0/1 selection matmuls: no F.unfold at all,
    and the selection matrices pick exactly the positions F.unfold would."""
    seen = []
    real = F.unfold

    def spy(inp, *a, **k):
        seen.append(inp.shape[0])
        return real(inp, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "unfold", spy)
    m = make("stride2_pad1_dil2_groups2")
    x = inputs("stride2_pad1_dil2_groups2", n=5)
    ADAPTER.input_diagonal(m, x, m(x), DT)
    assert seen == []
    from curvlab.plugins.adapters.conv2d import window_selection

    sel = window_selection(9, 3, 3, 2, 2, torch.device("cpu"), DT)  # size 9, out 3, k3 s2 d2
    want = torch.zeros(3, 9, dtype=DT)
    for i in range(3):
        for p in range(3):
            want[i, i * 2 + 2 * p] = 1
    assert torch.equal(sel, want)


@pytest.mark.parametrize(
    "name", ["k3", "stride2_pad1_dil2_groups2", "groups3_1x1_no_bias", "depthwise"]
)
def test_curvature_layout_equals_squared_per_example_gradient(name):
    """With a single row (one sample, one output position) the per-example gradient is g ⊗ ā, so
    its square must be exactly ``curvature(H, S)`` built from that row's statistics."""
    m = make(name)
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    ph, pw = m.padding
    side = (dh * (kh - 1) + 1 - 2 * ph, dw * (kw - 1) + 1 - 2 * pw)
    if min(side) < 1:  # padded kernels: take the input that gives one output position
        side = (max(side[0], 1), max(side[1], 1))
    x = torch.randn(1, m.in_channels, *side, dtype=DT)
    out = m(x)
    if out.shape[-2:] != (1, 1):
        pytest.skip("geometry gives more than one output position")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(ADAPTER.parameters(m).values()), g)
    H = ADAPTER.input_diagonal(m, x, out, DT)
    S = ADAPTER.output_diagonal(m, g, DT)
    assert H.count == S.count == 1
    curv = ADAPTER.curvature(m, H.total, S.total)
    for (role, p), gr in zip(ADAPTER.parameters(m).items(), grads, strict=True):
        assert curv[role].shape == p.shape
        torch.testing.assert_close(curv[role], gr**2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["k3", "stride2_pad1_dil2_groups2", "groups3_1x1_no_bias"])
def test_curvature_layout_arbitrary_factors(name):
    """F_W[o, c, i, j] = S[o]·H[k(o), c·kh·kw + i·kw + j], F_b[o] = S[o]·H[k(o), −1]."""
    m = make(name)
    G = m.groups
    D = m.weight[0].numel() + (m.bias is not None)
    H = torch.rand(G, D, dtype=DT) if G > 1 else torch.rand(D, dtype=DT)
    S = torch.rand(m.out_channels, dtype=DT)
    curv = ADAPTER.curvature(m, H, S)
    H2 = H.reshape(G, D)
    per = m.out_channels // G
    for o in range(m.out_channels):
        k = o // per
        cin_g, kh, kw = m.weight.shape[1:]
        for c in range(cin_g):
            for i in range(kh):
                for j in range(kw):
                    assert curv["weight"][o, c, i, j] == S[o] * H2[k, c * kh * kw + i * kw + j]
        if m.bias is not None:
            assert curv["bias"][o] == S[o] * H2[k, -1]


def test_statistics_accumulate_in_requested_dtype():
    m = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    stat = ADAPTER.input_diagonal(m, x, m(x), torch.float64)
    assert stat.total.dtype == torch.float64
    want = (with_ones(basis_patches(m.double(), x.double()), m) ** 2).mean(1)
    torch.testing.assert_close(stat.total / stat.count, want, rtol=1e-10, atol=1e-12)
