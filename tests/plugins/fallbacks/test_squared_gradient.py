"""``fallback="squared_gradient"``: each uncovered parameter's own diagonal empirical Fisher,
checked against an EMA of g² and the documented normalisation and damping computed here."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import curvlab
from curvlab.plugins.fallbacks.squared_gradient import EMA_KEY, UPDATES_KEY

from .conftest import FALLBACK_NAMES, LAM, loss_of, make_batches

pytestmark = pytest.mark.filterwarnings("ignore::curvlab.CurvatureFallbackWarning")


def minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


def named(model):
    return dict(model.named_parameters())


def test_state_is_an_ema_of_squared_gradients_on_curvature_steps(model):
    gamma, interval = 0.7, 2
    opt = curvlab.AdaFisher(
        model, lr=1e-2, gamma=gamma, curvature_interval=interval, fallback="squared_gradient"
    )
    params = named(model)
    ema = {name: torch.zeros_like(params[name]) for name in FALLBACK_NAMES}  # independent
    for t, batch in enumerate(make_batches(5)):
        opt.zero_grad()
        loss_of(model, batch).backward()
        if t % interval == 0:
            for name in FALLBACK_NAMES:
                g = params[name].grad
                ema[name] = gamma * ema[name] + (1 - gamma) * g * g
        opt.step()
    for name in FALLBACK_NAMES:
        p = params[name]
        state = opt.state[p]
        torch.testing.assert_close(state[EMA_KEY], ema[name], rtol=1e-14, atol=0, msg=name)
        assert state[UPDATES_KEY].item() == 3  # curvature steps 0, 2, 4
        # normalised over the whole tensor (min-max) and damped like the layers: + λ
        torch.testing.assert_close(
            opt.preconditioner(p), minmax(ema[name]) + LAM, rtol=1e-13, atol=0, msg=name
        )
    # covered layers keep their Kronecker factors; no fallback state there
    assert EMA_KEY not in opt.state[model.inp.weight]
    assert opt.coverage().fallback_rule == "squared_gradient"


def test_first_step_by_hand(model):
    """Step 1 of AdaFisher: m̂ = g, θ ← θ − α g / (minmax((1−γ) g²) + λ)."""
    lr, gamma = 1e-2, 0.8
    opt = curvlab.AdaFisher(model, lr=lr, gamma=gamma, fallback="squared_gradient")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, make_batches(1)[0]).backward()
    opt.step()
    for name in FALLBACK_NAMES:
        p = named(model)[name]
        g = p.grad
        F = minmax((1 - gamma) * g * g) + LAM
        torch.testing.assert_close(p.detach(), before[name] - lr * g / F, rtol=1e-13, atol=1e-15)


def test_identity_until_the_first_accepted_update(model):
    opt = curvlab.AdaFisher(model, fallback="squared_gradient")
    assert torch.equal(opt.preconditioner(model.scale), torch.full_like(model.scale, 1 + LAM))
    x, y = make_batches(1)[0]
    x[0, 0, 0] = float("nan")  # the first step is skipped: state created, never updated
    loss_of(model, (x, y)).backward()
    opt.step()
    assert opt.metrics()["skipped_steps"] == 1
    assert opt.state[model.scale][UPDATES_KEY].item() == 0
    assert torch.equal(opt.state[model.scale][EMA_KEY], torch.zeros_like(model.scale))
    assert torch.equal(opt.preconditioner(model.scale), torch.full_like(model.scale, 1 + LAM))


def test_nan_step_leaves_the_state_unchanged(model):
    opt = curvlab.AdaFisher(model, lr=1e-2, fallback="squared_gradient")
    for batch in make_batches(2):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    params = [named(model)[n] for n in FALLBACK_NAMES]
    saved = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    values = [p.detach().clone() for p in params]
    x, y = make_batches(1, seed=5)[0]
    x[1, 2, 0] = float("nan")
    opt.zero_grad()
    loss_of(model, (x, y)).backward()
    assert not torch.isfinite(model.scale.grad).all()
    opt.step()
    assert opt.metrics() == {"steps": 3, "skipped_steps": 1}
    for p, state, value in zip(params, saved, values, strict=True):
        for key, tensor in state.items():
            assert torch.equal(opt.state[p][key], tensor), key
        assert torch.equal(p.detach(), value)


def test_save_load_round_trips_and_continues_bitwise(model):
    def make(m):
        return curvlab.AdaFisherW(m, lr=1e-2, weight_decay=1e-2, fallback="squared_gradient")

    opt = make(model)
    data = make_batches(6)
    for batch in data[:3]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    index = [p for group in opt.param_groups for p in group["params"]].index(model.scale)
    assert EMA_KEY in saved["opt"]["state"][index]

    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key
    for m, o in ((model, opt), (resumed_model, resumed)):
        for batch in data[3:]:
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][key], value), (name, key)


def test_damped_like_the_layers_under_factored_damping(model):
    """K-FAC's parts: identity normaliser (raw EMA) and factored damping, which for a single
    factor adds λ after it."""
    gamma = 0.9
    opt = curvlab.CurvatureOptimizer(
        model,
        lr=1e-3,
        gamma=gamma,
        normalizer="identity",
        damping="factored",
        update_rule="kfac",
        fallback="squared_gradient",
    )
    loss_of(model, make_batches(1)[0]).backward()
    g = model.scale.grad.clone()
    opt.step()
    torch.testing.assert_close(
        opt.preconditioner(model.scale), (1 - gamma) * g * g + LAM, rtol=1e-13, atol=0
    )


def test_sqrt_ablation_divides_by_the_root(model):
    opt = curvlab.AdaFisher(
        model,
        lr=1e-2,
        fallback="squared_gradient",
        update_rule=curvlab.registry.create("updates", "adafisher", power=0.5),
    )
    before = model.scale.detach().clone()
    loss_of(model, make_batches(1)[0]).backward()
    opt.step()
    expected = before - 1e-2 * model.scale.grad / opt.preconditioner(model.scale).sqrt()
    torch.testing.assert_close(model.scale.detach(), expected, rtol=1e-13, atol=1e-15)


def test_gamma_option_and_gin_binding(model):
    opt = curvlab.build_optimizer(
        model,
        "configs/ablations/fallback_squared_gradient.gin",
        bindings=["fallbacks.squared_gradient.gamma = 0.5"],
    )
    assert opt.fallback.gamma == 0.5 and opt.gamma == 0.8
    loss_of(model, make_batches(1)[0]).backward()
    g = model.scale.grad.clone()
    opt.step()
    torch.testing.assert_close(opt.state[model.scale][EMA_KEY], 0.5 * g * g, rtol=1e-14, atol=0)
    # the reference form and Python constructors
    opt = curvlab.build_optimizer(
        model,
        "configs/adafisher.gin",
        bindings=[
            "optimizer.fallback = @fallbacks.squared_gradient()",
            "fallbacks.squared_gradient.gamma = 0.25",
        ],
    )
    assert opt.fallback.gamma == 0.25
    assert curvlab.registry.create("fallbacks", "squared_gradient").gamma is None
    with pytest.raises(ValueError, match="squared_gradient gamma must be in \\[0, 1\\), got 1.0"):
        curvlab.registry.create("fallbacks", "squared_gradient", gamma=1.0)


def test_uncaptured_layer_gets_the_rule_too():
    """A Linear whose weight is used functionally is paired but never captured: from the first
    curvature step on it counts as fallback and gets the squared-gradient curvature."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)

    torch.manual_seed(0)
    model = Functional().double()
    opt = curvlab.AdaFisher(model, lr=1e-2, fallback="squared_gradient")
    assert opt.coverage().share == 1.0  # before any step: paired, so counted as covered
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="squared_gradient"):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    grad = model.b.weight.grad
    torch.testing.assert_close(
        opt.preconditioner(model.b.weight), minmax(0.2 * grad * grad) + LAM, rtol=1e-13, atol=0
    )
    coverage = opt.coverage()
    assert [f.name for f in coverage.fallback] == ["b.weight", "b.bias"]
    assert coverage.covered_elements == 16 and coverage.total_elements == 16 + 10
