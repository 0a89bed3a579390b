"""Mixed precision (issue 8, item 2): fp16 autocast with ``torch.amp.GradScaler`` and bf16
autocast, on CPU.

Measured with torch 2.13 CPU: ``torch.autocast("cpu", dtype=torch.float16)`` is supported
(Linear and Conv2d run in fp16) and ``torch.amp.GradScaler("cpu")`` works; bf16 autocast needs
no scaler. What these tests pin down:

* the optimizers train under both, parameters stay fp32 and every factor (and eigenbasis) in
  ``opt.curvature_state`` stays finite fp32, even when fp16 activations square beyond the fp16
  range (statistics are accumulated in fp32 with autocast disabled);
* an iteration that ``GradScaler`` skips (it found an inf and never calls ``opt.step()``)
  leaves no trace as long as ``opt.zero_grad()`` starts the next iteration: the statistics it
  captured are dropped with the gradients. With ``model.zero_grad()`` they survive into the
  next ``step()``, whose own finite check then skips that step too (documented limit);
* the loss scale reaches the factors: the captured output gradients are those of the *scaled*
  loss, so S (or K-FAC's G) is stored in units of scale². Min-max normalised factors (AdaFisher
  paper/official, banded) cancel it up to min-max's ε, Adam's squared gradient never sees it
  (the scaler unscales ``p.grad`` before ``step()``); K-FAC with the identity normaliser does
  not cancel it, which is why ``opt.attach_grad_scaler(scaler)`` exists: with it, factors are
  kept in the units of the unscaled loss (bitwise, for power-of-two scales).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT

CONFIGS = CONFIG_ROOT


def _fp16_autocast_runs_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(2, 2)(torch.ones(1, 2))
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch
        return False
    return out.dtype == torch.float16


FP16 = _fp16_autocast_runs_on_cpu()
needs_fp16 = pytest.mark.skipif(not FP16, reason="fp16 autocast / GradScaler not supported on CPU")


# -- models, data, optimizers --------------------------------------------------------------------
def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn() -> nn.Sequential:
    """Conv2d, BatchNorm2d, GroupNorm, LayerNorm, Linear: every norm-layer path under autocast."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def vector_data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def image_data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()


def config(name: str, *bindings: str):
    return lambda m: curvlab.build_optimizer(m, CONFIGS / name, bindings=bindings)


OPTIMIZERS = {
    "paper": lambda m: curvlab.AdaFisher(m, lr=1e-3),
    "official": lambda m: curvlab.AdaFisher(m, lr=1e-3, variant="official", curvature_interval=1),
    "adafisherw": lambda m: curvlab.AdaFisherW(m, lr=1e-3, weight_decay=1e-2),
    "kfac": config("kfac.gin"),
    "banded": config("banded_adafisher.gin", "optimizer.lr = 1e-2"),
    "adam": config("adam.gin", "optimizer.lr = 1e-2"),
}
#: what trains under a GradScaler (K-FAC: see test_loss_scale_cancels_out_of_the_step)
SCALER_SAFE = ["paper", "official", "adafisherw", "banded", "adam"]


def build(name: str, model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        return OPTIMIZERS[name](model)


def amp_step(model, opt, scaler, x, y, dtype, zero_grad="optimizer", loss_factor=1.0):
    """One iteration of the torch.amp recipe; returns the (unscaled) loss."""
    if zero_grad == "optimizer":
        opt.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * loss_factor).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def floating_curvature(opt) -> dict[str, torch.Tensor]:
    out = {}
    for name, state in opt.curvature_state.items():
        for key, value in state.items():
            if value.is_floating_point():
                out[f"{name}.{key}"] = value
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for key, value in opt.state.get(p, {}).items():
            if value.is_floating_point() and value.dim():
                out[f"param{i}.{key}"] = value
    return out


def assert_fp32_finite_state(opt) -> None:
    state = floating_curvature(opt)
    assert state, "no curvature/optimizer state"
    for name, value in state.items():
        assert value.dtype == torch.float32, f"{name} is {value.dtype}"
        assert torch.isfinite(value).all(), f"{name} is not finite"


# -- fp16 + GradScaler ---------------------------------------------------------------------------
@needs_fp16
@pytest.mark.parametrize(
    "name",
    SCALER_SAFE + ["kfac"],
)
def test_fp16_gradscaler_trains_and_factors_stay_finite_fp32(name):
    torch.manual_seed(0)
    model = cnn()
    opt = build(name, model)
    scaler = torch.amp.GradScaler("cpu")
    opt.attach_grad_scaler(scaler)
    x, y = image_data()
    before = [p.detach().clone() for p in model.parameters()]
    losses = [amp_step(model, opt, scaler, x, y, torch.float16) for _ in range(12)]
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(x).dtype == torch.float16  # it really ran in fp16
    assert opt.metrics() == {"steps": 12, "skipped_steps": 0}
    assert losses[-1] < 0.9 * losses[0]
    for b, p in zip(before, model.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        assert not torch.equal(b, p)
    assert_fp32_finite_state(opt)


@needs_fp16
def test_fp16_activations_that_square_beyond_fp16_range_give_finite_fp32_factors():
    # layer 0's fp16 output is ~±1000: finite in fp16, but its square (~1e6) is not
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    x, y = vector_data()
    x = x * 300.0
    with torch.autocast("cpu", dtype=torch.float16):
        hidden = model[0](x)
    assert hidden.dtype == torch.float16 and torch.isfinite(hidden).all()
    assert not torch.isfinite(hidden * hidden).all()
    opt = curvlab.AdaFisher(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    amp_step(model, opt, scaler, x, y, torch.float16)
    assert opt.metrics() == {"steps": 1, "skipped_steps": 0}
    H = opt.curvature_state["1"]["H"]
    assert H.dtype == torch.float32 and torch.isfinite(H).all()
    # the fp32 mean of the squared fp16 activations (with the bias entry 1), EMA from zero
    a = torch.cat([hidden.float(), torch.ones(len(x), 1)], dim=1)
    torch.testing.assert_close(H, (1 - opt.gamma) * (a * a).mean(0), rtol=1e-5, atol=0.0)
    assert_fp32_finite_state(opt)


@needs_fp16
@pytest.mark.parametrize("name", ["paper", "official", "kfac", "banded", "adam"])
def test_gradscaler_skipped_iteration_leaves_no_trace(name):
    """Iteration 2 overflows in fp16 (its loss is multiplied by 1e30): GradScaler skips
    ``opt.step()`` and halves its scale. The run must equal one where that batch never
    happened and the scale was halved by hand, bitwise."""
    x, y = image_data(n=48)
    batches = list(zip(x.split(8), y.split(8)))
    bad = 2

    def run(overflow: bool):
        torch.manual_seed(0)
        model = cnn()
        opt = build(name, model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
        for i, (xb, yb) in enumerate(batches):
            if i == bad and not overflow:
                scaler.update(new_scale=scaler.get_scale() / 2)
                continue
            before = [p.detach().clone() for p in model.parameters()]
            state_before = {k: v.clone() for k, v in floating_curvature(opt).items()}
            amp_step(
                model, opt, scaler, xb, yb, torch.float16, loss_factor=1e30 if i == bad else 1.0
            )
            if i == bad:  # the scaler skipped the step: nothing moved ...
                assert scaler.get_scale() == 2.0**15
                assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
                after = floating_curvature(opt)
                assert all(torch.equal(v, after[k]) for k, v in state_before.items())
                # ... and the optimizer never ran: the skip is the scaler's, not counted here
                assert opt.metrics() == {"steps": bad, "skipped_steps": 0}
                # the non-finite statistics of that backward wait in the capture buffers
                assert (
                    any(
                        r.has_statistics and not torch.isfinite(r.output_total).all()
                        for r in opt.layers
                    )
                    or name == "adam"
                )
        return model, opt, scaler

    model_a, opt_a, scaler_a = run(overflow=True)
    model_b, opt_b, scaler_b = run(overflow=False)
    assert scaler_a.get_scale() == scaler_b.get_scale()
    assert opt_a.metrics() == opt_b.metrics() == {"steps": 5, "skipped_steps": 0}
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    state_a, state_b = floating_curvature(opt_a), floating_curvature(opt_b)
    assert set(state_a) == set(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert_fp32_finite_state(opt_a)


@needs_fp16
@pytest.mark.parametrize("name", ["paper", "kfac"])
def test_model_zero_grad_carries_the_skipped_statistics_into_the_next_step(name):
    """Documented limit: ``model.zero_grad()`` does not clear the optimizer's capture buffers,
    so the statistics of the scaler-skipped backward are added to the next iteration's. They are
    non-finite, so that next ``step()`` is skipped by the optimizer's own finite check
    (``skipped_steps`` = 1) although the scaler believes it ran; training then continues."""
    x, y = image_data(n=48)
    batches = list(zip(x.split(8), y.split(8)))
    torch.manual_seed(0)
    model = cnn()
    opt = build(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    for i, (xb, yb) in enumerate(batches):
        before = [p.detach().clone() for p in model.parameters()]
        amp_step(
            model,
            opt,
            scaler,
            xb,
            yb,
            torch.float16,
            zero_grad="model",
            loss_factor=1e30 if i == 2 else 1.0,
        )
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert unchanged == (i in (2, 3)), i
    assert opt.metrics() == {"steps": 5, "skipped_steps": 1}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_fp32_finite_state(opt)


# -- the loss scale and the factors ---------------------------------------------------------------
def _run_scaled(name, scale, steps=4, attach=False):
    """fp32 (no autocast) with or without a constant GradScaler scale: p.grad is bitwise the
    same (powers of two), so only the captured statistics see the scale (unless the scaler is
    attached to the optimizer, which divides it out)."""
    torch.manual_seed(0)
    model = mlp()
    opt = build(name, model)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=scale or 1.0, growth_interval=10**6, enabled=scale is not None
    )
    if attach:
        opt.attach_grad_scaler(scaler)
    x, y = vector_data()
    start = [p.detach().clone() for p in model.parameters()]
    for xb, yb in zip(x.split(8)[:steps], y.split(8)[:steps]):
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(model(xb), yb)).backward()
        scaler.step(opt)
        scaler.update()
    return [p.detach() - s for p, s in zip(model.parameters(), start)], opt


def test_factors_are_stored_in_loss_scale_units():
    """After one step with scale s the paper variant's S is exactly s² times the unscaled S
    (H is untouched): the EMA holds statistics of the scaled loss."""
    scale = 2.0**12
    _, plain = _run_scaled("paper", None, steps=1)
    _, scaled = _run_scaled("paper", scale, steps=1)
    _, attached = _run_scaled("paper", scale, steps=1, attach=True)
    for name, state in plain.curvature_state.items():
        assert torch.equal(scaled.curvature_state[name]["H"], state["H"])
        assert torch.equal(scaled.curvature_state[name]["S"], state["S"] * scale**2)
        # with the scaler attached the factors are those of the unscaled loss, bitwise
        assert torch.equal(attached.curvature_state[name]["S"], state["S"])


@pytest.mark.parametrize(
    "name, rtol",
    [
        ("paper", 1e-2),  # min-max's ε = 1e-6 is relative to the raw (scaled) factor range
        ("official", 1e-2),
        ("adafisherw", 1e-2),
        ("banded", 1e-2),
        ("adam", 0.0),  # bitwise: the squared gradient is taken from the unscaled p.grad
        ("kfac", 1e-10),  # needs the attached scaler: the identity normaliser cancels nothing
    ],
)
def test_loss_scale_cancels_out_of_the_step(name, rtol):
    plain, _ = _run_scaled(name, None)
    scaled, _ = _run_scaled(name, 2.0**16, attach=name == "kfac")
    for a, b in zip(plain, scaled, strict=True):
        assert a.abs().max() > 0
        if rtol == 0.0:
            assert torch.equal(a, b)
        else:
            assert ((a - b).norm() / a.norm()).item() < rtol


# -- bf16 autocast --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["paper", "official", "kfac", "banded", "adam"])
@pytest.mark.parametrize(
    "factory, data", [(mlp, vector_data), (cnn, image_data)], ids=["mlp", "cnn"]
)
def test_bf16_autocast_trains_and_factors_stay_fp32(name, factory, data):
    torch.manual_seed(0)
    model = factory()
    opt = build(name, model)
    x, y = data()
    losses = []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.metrics() == {"steps": 12, "skipped_steps": 0}
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert_fp32_finite_state(opt)
