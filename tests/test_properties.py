"""Property tests (issue 8, item 7): random MLP / CNN shapes, batch sizes (1 included) and
dtypes (float32, float64).

For every optimizer: after each step the update is finite, parameters stay finite, and
``opt.preconditioner(p)`` has the parameter's shape and dtype and is finite and positive.
AdaFisher (paper and official) and banded AdaFisher also satisfy ``F ≥ λ`` everywhere: min-max
maps each factor (banded: each spectrum) into [0, 1), so ``S'⊗H' ≥ 0``; the official variant's
EMA from ones keeps its factors positive, and its fallback F = 1 ≥ λ. K-FAC's factored damping
gives ``(S + √λ/π)(H + π√λ)`` with PSD factors, which is positive but only ≥ λ up to rounding of
the eigendecomposition, so only positivity is asserted there.

Examples are derandomised (the same on every run) and few, to keep this file fast.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- random models -------------------------------------------------------------------------------
@st.composite
def mlp_specs(draw):
    return dict(
        kind="mlp",
        batch=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        d_in=draw(st.integers(1, 5)),
        hidden=draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)),
        d_out=draw(st.integers(1, 4)),
        bias=draw(st.booleans()),
        layernorm=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def cnn_specs(draw):
    size = draw(st.integers(3, 6))
    kernel = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    return dict(
        kind="cnn",
        batch=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        c_in=groups * draw(st.integers(1, 2)),
        c_out=groups * draw(st.integers(1, 2)),
        groups=groups,
        size=size,
        kernel=kernel,
        stride=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 1)),
        bias=draw(st.booleans()),
        batchnorm=draw(st.booleans()),
        d_out=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def build_model(spec: dict) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model, an input batch and a regression target for ``spec``."""
    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    n = spec["batch"]
    if spec["kind"] == "mlp":
        layers: list[nn.Module] = []
        width = spec["d_in"]
        for i, h in enumerate(spec["hidden"]):
            layers.append(nn.Linear(width, h, bias=spec["bias"]))
            if i == 0 and spec["layernorm"]:
                layers.append(nn.LayerNorm(h))
            layers.append(nn.Tanh())
            width = h
        layers.append(nn.Linear(width, spec["d_out"], bias=spec["bias"]))
        x = torch.randn(n, spec["d_in"])
    else:
        conv = nn.Conv2d(
            spec["c_in"],
            spec["c_out"],
            spec["kernel"],
            stride=spec["stride"],
            padding=spec["padding"],
            groups=spec["groups"],
            bias=spec["bias"],
        )
        x = torch.randn(n, spec["c_in"], spec["size"], spec["size"])
        out = conv(x)
        layers = [conv]
        if spec["batchnorm"] and n * out.shape[-1] * out.shape[-2] > 1:  # BN needs > 1 value
            layers.append(nn.BatchNorm2d(spec["c_out"]))
        layers += [nn.ReLU(), nn.Flatten(), nn.Linear(out[0].numel(), spec["d_out"])]
    model = nn.Sequential(*layers).to(dtype)
    target = torch.randn(n, spec["d_out"], dtype=dtype)
    return model, x.to(dtype), target


# -- optimizers ----------------------------------------------------------------------------------
def make_optimizer(name: str, model: nn.Module, damping: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        if name == "paper":
            return curvlab.AdaFisher(model, lr=1e-3, damping=damping)
        if name == "official":
            return curvlab.AdaFisher(
                model, lr=1e-3, damping=damping, variant="official", curvature_interval=1
            )
        if name == "kfac":
            bindings = [f"damping.factored.value = {damping!r}", "optimizer.inverse_interval = 1"]
            return curvlab.build_optimizer(model, CONFIG_ROOT / "kfac.gin", bindings=bindings)
        if name == "banded":
            bindings = [f"optimizer.damping = {damping!r}", "estimators.banded.bandwidth = 2"]
            return curvlab.build_optimizer(
                model, CONFIG_ROOT / "banded_adafisher.gin", bindings=bindings
            )
    raise AssertionError(name)


def check_steps(name: str, spec: dict, damping: float, steps: int = 3) -> None:
    model, x, target = build_model(spec)
    opt = make_optimizer(name, model, damping)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        skipped = opt.metrics()["skipped_steps"]
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()
        # α/λ can be large (small λ, large MSE gradients): a diverging run overflows, and the
        # overflowing step must then be skipped, never written
        was_skipped = opt.metrics()["skipped_steps"] > skipped
        for p, b in zip(params, before, strict=True):
            delta = p.detach() - b
            assert torch.isfinite(p).all(), "non-finite parameter"
            assert torch.isfinite(delta).all(), "non-finite update"
            if was_skipped:
                assert not delta.any(), "a skipped step moved a parameter"
            F_p = opt.preconditioner(p)
            assert F_p.shape == p.shape
            assert F_p.dtype == p.dtype
            assert torch.isfinite(F_p).all()
            assert (F_p > 0).all()
            if name != "kfac":
                assert (F_p >= damping).all(), f"min F = {F_p.min().item()} < λ = {damping}"


MODEL_SPECS = st.one_of(mlp_specs(), cnn_specs())
DAMPINGS = st.sampled_from([1e-4, 1e-3, 1e-1])
BATCH_ONE = dict(
    kind="cnn",
    batch=1,
    dtype="float32",
    c_in=2,
    c_out=2,
    groups=2,
    size=3,
    kernel=3,
    stride=1,
    padding=0,
    bias=True,
    batchnorm=True,
    d_out=1,
    seed=0,
)  # one output position per sample: BatchNorm is left out, every factor from a single row

#: LayerNorm over one feature: its output and output gradient are zero (degenerate factors)
TINY_MLP = dict(
    kind="mlp",
    batch=1,
    dtype="float64",
    d_in=1,
    hidden=[1],
    d_out=1,
    bias=True,
    layernorm=True,
    seed=0,
)


@pytest.mark.parametrize("name", ["paper", "official"])
@SETTINGS
@given(spec=MODEL_SPECS, damping=DAMPINGS)
@example(spec=BATCH_ONE, damping=1e-3)
@example(spec=TINY_MLP, damping=1e-3)
def test_adafisher_preconditioner_is_at_least_damping(name, spec, damping):
    check_steps(name, spec, damping)


@pytest.mark.parametrize("name", ["kfac", "banded"])
@SETTINGS
@given(spec=MODEL_SPECS, damping=DAMPINGS)
@example(spec=BATCH_ONE, damping=1e-3)
def test_kfac_and_banded_updates_are_finite_and_shapes_match(name, spec, damping):
    check_steps(name, spec, damping)


@pytest.mark.parametrize(
    "scale",
    [
        1e30,
        1e36,  # its norm overflows fp32: the step is skipped
    ],
)
def test_huge_finite_gradient_gives_a_finite_update(scale):
    """The edge of "updates finite": AdaFisher divides by F ≥ λ, so it amplifies a gradient by
    up to α/λ; a finite gradient must still never produce a non-finite parameter (apply a
    finite step or skip it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = curvlab.AdaFisher(model, lr=1e-3, damping=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad.mul_(scale)
        assert torch.isfinite(p.grad).all()
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all(), "non-finite parameter"
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


# -- docs/reliability.md cites tests that exist --------------------------------------------------
def test_reliability_doc_cites_existing_tests():
    root = CONFIG_ROOT.parent
    text = (root / "docs" / "reliability.md").read_text()
    cited = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(cited) > 30
    for path, name in sorted(cited):
        source = root / path
        assert source.is_file(), f"docs/reliability.md cites a missing file {path}"
        assert re.search(rf"^\s*def {name}\(", source.read_text(), flags=re.M), (
            f"docs/reliability.md cites {path}::{name}, which does not exist"
        )
