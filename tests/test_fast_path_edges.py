"""Edge cases of the fast paths (issue 7), each a regression found in review.

The packed factors, cached products, shared input statistics, divisors and CPU finite check
must not change what the optimizer computes: checked here against straightforward formulas.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import CurvatureOptimizer, register
from curvlab.plugins.adapters.conv2d import Conv2dAdapter
from curvlab.plugins.adapters.linear import LinearAdapter
from curvlab.plugins.adapters.official import OfficialConv2dAdapter

pytestmark = pytest.mark.filterwarnings("ignore::curvlab.CurvatureFallbackWarning")


def minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


class _OwnLayoutLinear(LinearAdapter):
    """Overrides ``curvature`` (full tensors, new every call) instead of ``curvature_terms``."""

    def curvature(self, module, H, S):
        F_ = S[:, None] * H[None, :]
        return {"weight": F_[:, :-1].contiguous(), "bias": F_[:, -1].contiguous()}


register("adapters", "test_own_layout_linear")(_OwnLayoutLinear)


def test_curvature_override_is_rebuilt_every_step():
    """Products an adapter computes as new tensors are not cached: F follows the factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = CurvatureOptimizer(model, lr=1e-2, adapters=["test_own_layout_linear"], damping=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=g)).square().mean().backward()
        opt.step()
        state = opt.curvature_state["0"]
        expected = minmax(state["S"])[:, None] * minmax(state["H"])[None, :-1] + 1e-3
        torch.testing.assert_close(opt.preconditioner(model[0].weight), expected)


def test_fp16_parameters_keep_moving_at_small_learning_rates():
    """(1 − β^t)/α overflows fp16 for α < 1.5e-5: the divisor is computed in fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).half()
    opt = curvlab.AdaFisher(model, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    for _ in range(14):
        x, y = torch.randn(16, 6, generator=g).half(), torch.randn(16, 3, generator=g).half()
        before = model[2].bias.detach().clone()
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert opt.metrics()["skipped_steps"] == 0
    assert (model[2].bias.detach() - before).abs().max() > 0  # step 14 still moves


class _SubConv(nn.Conv2d):
    """A subclass: ``official_conv2d`` (exact type) skips it, ``conv2d`` takes it."""


def test_shared_input_statistic_needs_the_same_adapter_class():
    """Two layers read one tensor with equal signatures but adapters that compute different
    statistics (official_conv2d inherits conv2d's signature): each gets its own."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 4, 3, dilation=2), _SubConv(3, 4, 3, dilation=2)
    model = nn.ModuleDict({"a": a, "b": b})
    opt = CurvatureOptimizer(model, adapters=["official_conv2d", "conv2d"], gamma=0.0, lr=0.0)
    assert {type(r.adapter) for r in opt.layers} == {OfficialConv2dAdapter, Conv2dAdapter}
    x = torch.randn(5, 3, 9, 9)
    (a(x).sum() + b(x).sum()).backward()
    opt.step()
    for name, module, adapter in (("a", a, OfficialConv2dAdapter()), ("b", b, Conv2dAdapter())):
        with torch.no_grad():
            stat = adapter.input_diagonal(module, x, module(x), torch.float32)
        # official EMA is off here (paper EMA, γ = 0): the state is this step's mean
        torch.testing.assert_close(
            opt.curvature_state[name]["H"].reshape(-1), (stat.total / stat.count).reshape(-1)
        )


def test_hooked_model_pickles_and_its_copy_is_inert():
    """torch.save(model) with an optimizer attached: the hooks pickle the capture engine, not
    the optimizer; the loaded copy trains with plain autograd and its hooks capture nothing,
    while the original goes on as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = curvlab.AdaFisher(model)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert b"AdaFisher" not in buffer.getvalue()
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(copy(torch.ones(1, 4)), model(torch.ones(1, 4)))
    copy(torch.randn(3, 4)).sum().backward()  # inert hooks
    assert all(not r.has_statistics for r in opt.layers)
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    assert all(r.has_statistics for r in opt.layers)
    opt.step()


def test_inference_mode_inputs_are_captured():
    """Features made under inference_mode (no version counter) feed a head whose bias alone
    trains (autograd allows it: the input is not saved); the statistics are still captured."""
    backbone, head = nn.Linear(5, 4), nn.Linear(4, 3)
    head.weight.requires_grad_(False)
    opt = curvlab.AdaFisher(head)
    with torch.inference_mode():
        features = backbone(torch.randn(6, 5))
    for _ in range(2):
        opt.zero_grad()
        head(features).square().mean().backward()
        opt.step()
    assert opt.metrics() == {"steps": 2, "skipped_steps": 0}
    H = torch.cat([(features**2).mean(0), torch.ones(1)])
    torch.testing.assert_close(opt.curvature_state["<root>"]["H"], (1 - 0.8**2) * H)


def test_state_dict_is_a_snapshot_of_the_packed_factors():
    """Entries of state_dict() do not change as training goes on, and serialise alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = curvlab.AdaFisher(model)
    x = torch.randn(8, 4)
    for step in range(4):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        if step == 0:
            saved = opt.state_dict()["curvature"]["layers"]
            first = {n: {k: v.clone() for k, v in s.items()} for n, s in saved.items()}
    for name, state in first.items():
        for key, value in state.items():
            assert torch.equal(saved[name][key], value)
            assert (
                saved[name][key].untyped_storage().nbytes() == value.numel() * value.element_size()
            )
    assert not torch.equal(opt.curvature_state["0"]["H"], first["0"]["H"])


def test_conv_window_sums_ignore_reduced_matmul_precision():
    """The selection matmuls run in float64: a 'medium' float32 matmul precision setting
    (bf16 on CPUs that have it, TF32 on CUDA) does not round the window sums."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, stride=2)
    x = torch.randn(6, 8, 11, 11) * 3
    adapter = Conv2dAdapter()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.no_grad():
            stat = adapter.input_diagonal(conv, x, conv(x), torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    patches = F.unfold(x.double(), 3, padding=1, stride=2)  # (N, C·9, L)
    reference = (patches**2).sum((0, 2))
    torch.testing.assert_close(stat.total[0, :-1].double(), reference, rtol=1e-6, atol=0)


def test_cpu_finite_flag_accepts_large_float64_gradients():
    """fp64 gradients of 1e20 are finite (their norm fits fp32), as on CUDA."""
    model = nn.Linear(3, 2).double()
    opt = curvlab.AdaFisher(model, lr=0.0)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        model.weight.grad.fill_(1e20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.metrics()["skipped_steps"] == 0
