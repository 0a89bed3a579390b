"""transformers' Conv1D (weight stored (in, out)) against the verified nn.Linear with the
transposed weight: factors, curvature and trajectories for the diagonal, banded and full
estimators (float64), and the lazy lookup that never imports transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.plugins.adapters.hf_conv1d import HFConv1DAdapter

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D
DT = torch.float64


class Net(nn.Module):
    """proj (Conv1D or Linear) on (N, T, 5) inputs, then a Linear head: rows are N·T."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


class BiaslessConv1D(Conv1D):
    """transformers' Conv1D always has a bias; a subclass without one (still matched)."""

    def forward(self, x):
        return x @ self.weight


def twins(bias: bool = True) -> tuple[Net, Net]:
    # nf = 4 outputs, nx = 5 inputs: weight (5, 4)
    conv = (Conv1D if bias else BiaslessConv1D)(4, 5).double()
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
        else:
            conv.bias = None
    linear = nn.Linear(5, 4, bias=bias).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if bias:
            linear.bias.copy_(conv.bias)
    a, b = Net(conv).double(), Net(linear).double()
    b.head.load_state_dict(a.head.state_dict())
    return a, b


def batches(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(6, 3, 5, generator=g, dtype=DT), torch.randint(0, 3, (6, 3), generator=g))
        for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()


KFAC = dict(normalizer="identity", damping="factored", update_rule="kfac", gamma=0.9)
CASES = {
    "diagonal": dict(estimator="diagonal"),
    "banded": dict(estimator=curvlab.registry.create("estimators", "banded", bandwidth=2)),
    "full-minmax": dict(estimator="full"),
    "full-kfac": dict(estimator="full", **KFAC),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv1d_equals_linear_with_transposed_weight(case, bias):
    conv_net, linear_net = twins(bias)
    opt_c = curvlab.CurvatureOptimizer(conv_net, lr=1e-2, **CASES[case])
    opt_l = curvlab.CurvatureOptimizer(linear_net, lr=1e-2, **CASES[case])
    assert type(opt_c._layer_by_name["proj"].adapter) is HFConv1DAdapter
    assert opt_c.coverage().share == 1.0
    data = batches()
    train(conv_net, opt_c, data)
    train(linear_net, opt_l, data)
    # the factors: the same rows, so the same H (A) and S (G) whatever the structure
    for key in ("H", "S"):
        torch.testing.assert_close(
            opt_c.curvature_state["proj"][key],
            opt_l.curvature_state["proj"][key],
            rtol=1e-12,
            atol=1e-15,
        )
    # the curvature laid out on the (in, out) weight is the transpose of Linear's
    conv, linear = conv_net.proj, linear_net.proj
    torch.testing.assert_close(
        opt_c.preconditioner(conv.weight),
        opt_l.preconditioner(linear.weight).t(),
        rtol=1e-12,
        atol=1e-15,
    )
    # and the whole trajectory agrees (joint weight+bias eigenbasis solves included)
    torch.testing.assert_close(conv.weight, linear.weight.t(), rtol=1e-12, atol=1e-13)
    if bias:
        torch.testing.assert_close(
            opt_c.preconditioner(conv.bias),
            opt_l.preconditioner(linear.bias),
            rtol=1e-12,
            atol=1e-15,
        )
        torch.testing.assert_close(conv.bias, linear.bias, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(conv_net.head.weight, linear_net.head.weight, rtol=1e-12, atol=1e-13)


def test_curvature_is_squared_gradient_for_one_row():
    """With one row, the diagonal Fisher of [W, b] is the squared gradient (layout check
    independent of nn.Linear)."""
    m = Conv1D(3, 4).double()
    with torch.no_grad():
        m.bias.normal_()
    adapter = HFConv1DAdapter()
    x = torch.randn(1, 4, dtype=DT)
    out = m(x)
    g = torch.randn_like(out)
    gw, gb = torch.autograd.grad(out, [m.weight, m.bias], g)
    H = adapter.input_diagonal(m, x, out, DT)
    S = adapter.output_diagonal(m, g, DT)
    curv = adapter.curvature(m, H.total / H.count, S.total / S.count)
    torch.testing.assert_close(curv["weight"], gw**2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(curv["bias"], gb**2, rtol=1e-12, atol=1e-15)
    # the matrix view [Wᵀ, b] and back
    matrix = adapter.to_matrix(m, {"weight": gw, "bias": gb})
    torch.testing.assert_close(matrix[0], torch.cat([gw.t(), gb[:, None]], 1), rtol=0, atol=0)
    back = adapter.from_matrix(m, matrix)
    assert torch.equal(back["weight"], gw) and torch.equal(back["bias"], gb)


def test_official_variant_keeps_its_four_layer_types():
    conv_net, _ = twins()
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="no adapter for Conv1D"):
        opt = curvlab.AdaFisher(conv_net, variant="official")
    assert [f.name for f in opt.fallback_parameters()] == ["proj.weight", "proj.bias"]


def test_curvlab_never_imports_transformers():
    """The adapter looks the class up in sys.modules; importing curvlab and building an
    optimizer for a plain torch model leaves transformers unimported."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        import curvlab
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.RMSNorm(3))
        curvlab.AdaFisherW(model)
        assert "hf_conv1d" in curvlab.registered("adapters")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
