"""torch.optim semantics of the curvlab optimizers (public API, not the formulas)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import CurvatureFallbackWarning
from curvlab.registry import UnknownPluginError

LAM = 1e-3


# -- models, data, helpers ----------------------------------------------------------------------
def mlp(dtype=torch.float64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


class ConvNet(nn.Sequential):
    """Conv2d, BatchNorm2d, Linear, LayerNorm: every layer type both variants support."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )


class NoBNConvNet(nn.Sequential):
    """Per-sample layers only (micro-batches then see the same rows as the whole batch)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 6 * 6, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )


def clone_model(model: nn.Module, factory) -> nn.Module:
    """A fresh model (no optimizer hooks) with ``model``'s parameters and buffers."""
    fresh = factory()
    fresh.load_state_dict(model.state_dict())
    return fresh


def vector_batches(n_batches=6, n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
        for _ in range(n_batches)
    ]


def image_batches(n_batches=6, n=8, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
        for _ in range(n_batches)
    ]


def one_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train(model, opt, batches):
    for x, y in batches:
        one_step(model, opt, x, y)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def curvature_snapshot(opt) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in s.items()} for n, s in opt.curvature_state.items()}


def assert_same_curvature(a, b, **tol):
    assert set(a) == set(b)
    for name in a:
        for key in ("H", "S"):
            if tol:
                torch.testing.assert_close(a[name][key], b[name][key], **tol)
            else:
                assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs"


def assert_params_equal(model_a, model_b):
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs"


# -- param groups -------------------------------------------------------------------------------
def test_param_group_with_lr_zero_leaves_its_parameters_unchanged():
    model = mlp()
    opt = curvlab.AdaFisher(
        model,
        params=[{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}],
        lr=1e-2,
    )
    frozen_before, moving_before = params_of(model[0]), params_of(model[2])
    train(model, opt, vector_batches(3))
    for before, p in zip(frozen_before, model[0].parameters(), strict=True):
        assert torch.equal(before, p)
    for before, p in zip(moving_before, model[2].parameters(), strict=True):
        assert not torch.equal(before, p)
    # the lr=0 layer still has curvature (statistics do not depend on the learning rate)
    assert "0" in opt.curvature_state


def test_add_param_group_after_construction():
    model = mlp()
    opt = curvlab.AdaFisher(model, params=model[0].parameters(), lr=1e-2)
    assert [r.name for r in opt.layers] == ["0"]
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.preconditioner(model[2].weight)

    opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-3})
    assert [r.name for r in opt.layers] == ["0", "2"]
    assert opt.param_groups[1]["lr"] == 5e-3
    assert opt.param_groups[1]["beta"] == 0.9  # defaults filled in
    before = params_of(model)
    train(model, opt, vector_batches(2))
    for b, p in zip(before, model.parameters(), strict=True):
        assert not torch.equal(b, p)
    assert opt.fallback_parameters() == []
    assert not torch.all(opt.preconditioner(model[2].weight) == 1 + LAM)  # real curvature

    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})


def test_add_param_group_mid_training_keeps_reporting_captured_layers_correctly():
    model = mlp()
    opt = curvlab.AdaFisher(model, params=model[0].parameters(), lr=1e-2)
    train(model, opt, vector_batches(2))
    assert opt.fallback_parameters() == []
    opt.add_param_group({"params": list(model[2].parameters())})
    # layer 0 has curvature (its preconditioner is not the identity) ...
    assert not torch.all(opt.preconditioner(model[0].weight) == 1 + LAM)
    # ... so it must not be listed as a fallback parameter
    assert [f.name for f in opt.fallback_parameters() if f.name.startswith("0.")] == []


# -- LR schedulers ------------------------------------------------------------------------------
def test_step_lr_scheduler_scales_the_step():
    lr0 = 1e-2
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=lr0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    batches = vector_batches(4)
    seen = []
    for i, (x, y) in enumerate(batches):
        seen.append(opt.param_groups[0]["lr"])
        if i == 2:
            # a twin at the same state that takes this step at the undecayed lr
            twin = clone_model(model, mlp)
            twin_opt = curvlab.AdaFisher(twin, lr=lr0)
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch aliases tensors
            twin_opt.param_groups[0]["lr"] = lr0
            before = params_of(model)
            one_step(twin, twin_opt, x, y)
            twin_delta = [p - b for p, b in zip(twin.parameters(), before, strict=True)]
        one_step(model, opt, x, y)
        if i == 2:
            delta = [p - b for p, b in zip(model.parameters(), before, strict=True)]
            for d, t in zip(delta, twin_delta, strict=True):
                torch.testing.assert_close(d, 0.1 * t, rtol=1e-9, atol=1e-15)
        sched.step()
    assert seen == pytest.approx([lr0, lr0, 0.1 * lr0, 0.1 * lr0])
    assert sched.get_last_lr() == pytest.approx([0.01 * lr0])


# -- zero_grad, closure -------------------------------------------------------------------------
def test_zero_grad_set_to_none_and_step_without_gradients():
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=1e-2)
    before = params_of(model)
    with warnings.catch_warnings():  # it warns that no layer was captured (see the report)
        warnings.simplefilter("ignore", CurvatureFallbackWarning)
        opt.step()  # no gradient at all: a no-op for the parameters
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)

    x, y = vector_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)

    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_closure_gives_the_same_step_and_returns_the_loss():
    model_a = mlp()
    model_b = clone_model(model_a, mlp)
    opt_a = curvlab.AdaFisher(model_a, lr=1e-2)
    opt_b = curvlab.AdaFisher(model_b, lr=1e-2)
    for x, y in vector_batches(3):
        one_step(model_a, opt_a, x, y)

        def closure(x=x, y=y):
            opt_b.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model_b(x), y)
            loss.backward()
            return loss

        loss = opt_b.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert_params_equal(model_a, model_b)
    assert_same_curvature(opt_a.curvature_state, opt_b.curvature_state)


# -- state_dict round trip ----------------------------------------------------------------------
ROUND_TRIPS = {
    "paper": lambda m: curvlab.AdaFisher(m, lr=1e-2),
    "official": lambda m: curvlab.AdaFisher(m, lr=1e-3, variant="official", curvature_interval=2),
    "adafisherw": lambda m: curvlab.AdaFisherW(m, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("through_bytes", [False, True], ids=["in_process", "torch_save"])
@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_state_dict_round_trip_resumes_bitwise(kind, through_bytes):
    make_opt = ROUND_TRIPS[kind]
    batches = image_batches(6)
    k = 3

    reference = ConvNet()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_opt = make_opt(reference)
    train(reference, ref_opt, batches)

    first = ConvNet()
    first.load_state_dict(initial)
    opt = make_opt(first)
    train(first, opt, batches[:k])
    checkpoint = {"model": first.state_dict(), "optimizer": opt.state_dict()}
    if through_bytes:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        buf.seek(0)
        checkpoint = torch.load(buf)

    resumed = ConvNet()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_opt(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.metrics() == opt.metrics() == {"steps": k, "skipped_steps": 0}
    assert resumed_opt.is_curvature_step == opt.is_curvature_step
    train(resumed, resumed_opt, batches[k:])

    assert_params_equal(resumed, reference)
    assert_same_curvature(resumed_opt.curvature_state, ref_opt.curvature_state)
    for p, q in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(resumed_opt.preconditioner(p), ref_opt.preconditioner(q))


def test_state_dict_of_a_different_model_raises_value_error():
    opt = curvlab.AdaFisher(mlp(), lr=1e-2)
    model = mlp()
    train(model, opt_other := curvlab.AdaFisher(model), vector_batches(1))

    renamed = nn.Sequential()
    renamed.add_module("inp", nn.Linear(4, 8))
    renamed.add_module("act", nn.Tanh())
    renamed.add_module("out", nn.Linear(8, 3))
    with pytest.raises(ValueError, match="different layers"):
        curvlab.AdaFisher(renamed.double()).load_state_dict(opt_other.state_dict())

    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="shape"):
        curvlab.AdaFisher(wider).load_state_dict(opt_other.state_dict())

    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="not a curvlab optimizer state"):
        opt.load_state_dict(adam.state_dict())


def test_rejected_state_dict_leaves_the_optimizer_usable():
    model = mlp()
    opt = curvlab.AdaFisher(model)
    train(model, opt, vector_batches(1))
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    wider_opt = curvlab.AdaFisher(wider)
    train(wider, wider_opt, vector_batches(1))
    with pytest.raises(ValueError):
        wider_opt.load_state_dict(opt.state_dict())
    train(wider, wider_opt, vector_batches(1, seed=9))  # must still work
    assert wider_opt.metrics()["steps"] == 2


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Embedding(5, 3)

    def forward(self, idx):
        return self.layer(idx).sum(1)


class LinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 5, bias=False)  # weight (5, 3): the embedding's shape

    def forward(self, x):
        return self.layer(x)


def test_state_dict_with_incompatible_factors_is_rejected_at_load():
    emb = EmbeddingModel()
    emb_opt = curvlab.AdaFisher(emb)
    emb_opt.zero_grad()
    F.cross_entropy(emb(torch.randint(0, 5, (4, 2))), torch.randint(0, 3, (4,))).backward()
    emb_opt.step()
    lin = LinearModel()
    lin_opt = curvlab.AdaFisher(lin)
    with pytest.raises(ValueError):
        lin_opt.load_state_dict(emb_opt.state_dict())


# -- gradient accumulation ----------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(4, 4, 4), (6, 5, 1)], ids=["equal", "unequal"])
def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(sizes):
    whole = NoBNConvNet().double()
    accumulated = clone_model(whole, lambda: NoBNConvNet().double())
    opt_whole = curvlab.AdaFisher(whole, lr=1e-2)
    opt_acc = curvlab.AdaFisher(accumulated, lr=1e-2)
    for x, y in image_batches(2, n=12, dtype=torch.float64):
        one_step(whole, opt_whole, x, y)
        opt_acc.zero_grad(set_to_none=True)
        for xs, ys in zip(
            x.split(sizes), y.split(sizes), strict=True
        ):  # each loss weighted by its share
            (F.cross_entropy(accumulated(xs), ys) * (len(ys) / len(y))).backward()
        opt_acc.step()
        assert_same_curvature(
            opt_acc.curvature_state, opt_whole.curvature_state, rtol=1e-10, atol=1e-10
        )
        for p, q in zip(accumulated.parameters(), whole.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


# -- what is (not) captured ---------------------------------------------------------------------
def test_eval_mode_and_no_grad_forwards_leave_curvature_untouched():
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=1e-2)
    batches = vector_batches(2)
    train(model, opt, batches[:1])
    state = curvature_snapshot(opt)

    # eval mode, grad enabled, with a backward and a step: parameters move, factors do not
    model.eval()
    before = params_of(model)
    one_step(model, opt, *batches[1])
    assert not torch.equal(before[0], model[0].weight)
    assert_same_curvature(opt.curvature_state, state)

    # train mode under torch.no_grad, then a step with the old gradients: factors do not move
    model.train()
    with torch.no_grad():
        model(batches[1][0])
    opt.step()
    assert_same_curvature(opt.curvature_state, state)


def test_eval_forward_between_steps_changes_nothing():
    plain = mlp()
    probed = clone_model(plain, mlp)
    opt_plain = curvlab.AdaFisher(plain, lr=1e-2)
    opt_probed = curvlab.AdaFisher(probed, lr=1e-2)
    probe = torch.randn(32, 4, dtype=torch.float64)
    for x, y in vector_batches(3):
        one_step(plain, opt_plain, x, y)
        opt_probed.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probed(x), y)
        probed.eval()
        with torch.no_grad():
            probed(probe)  # a validation forward between forward and step
        probed.train()
        loss.backward()
        opt_probed.step()
    assert_params_equal(plain, probed)
    assert_same_curvature(opt_plain.curvature_state, opt_probed.curvature_state)


def test_pause_capture_blocks_statistics_inside_the_block_only():
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=1e-2)
    batches = vector_batches(3)
    train(model, opt, batches[:1])
    state = curvature_snapshot(opt)
    with opt.pause_capture():
        with opt.pause_capture():
            pass
        one_step(model, opt, *batches[1])  # training mode, grad enabled, still paused
    assert_same_curvature(opt.curvature_state, state)
    one_step(model, opt, *batches[2])  # capture resumes after the block
    assert not torch.equal(opt.curvature_state["0"]["H"], state["0"]["H"])


def test_forward_without_backward_adds_nothing():
    plain = mlp()
    wasted = clone_model(plain, mlp)
    opt_plain = curvlab.AdaFisher(plain, lr=1e-2)
    opt_wasted = curvlab.AdaFisher(wasted, lr=1e-2)
    extra = torch.randn(16, 4, dtype=torch.float64) * 5
    for x, y in vector_batches(3):
        one_step(plain, opt_plain, x, y)
        wasted(extra)  # training mode, grad enabled, output dropped
        one_step(wasted, opt_wasted, x, y)
    assert_params_equal(plain, wasted)
    assert_same_curvature(opt_plain.curvature_state, opt_wasted.curvature_state)


# -- non-finite values --------------------------------------------------------------------------
def _full_state(model, opt):
    return (
        params_of(model),
        [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        curvature_snapshot(opt),
    )


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("position", [0, 2], ids=["first_step", "third_step"])
@pytest.mark.parametrize("where", ["input", "gradient"])
def test_non_finite_step_is_skipped_and_training_continues(where, position, variant):
    clean = mlp()
    faulty = clone_model(clean, mlp)
    make = dict(lr=1e-2, variant=variant, curvature_interval=1)
    opt_clean = curvlab.AdaFisher(clean, **make)
    opt_faulty = curvlab.AdaFisher(faulty, **make)
    batches = vector_batches(4)
    train(clean, opt_clean, batches)

    train(faulty, opt_faulty, batches[:position])
    params, momentum, factors = _full_state(faulty, opt_faulty)
    x, y = batches[position]
    opt_faulty.zero_grad(set_to_none=True)
    if where == "input":  # NaN gradients and NaN statistics
        x = x.clone()
        x[0, 0] = math.nan
        F.cross_entropy(faulty(x), y).backward()
    else:  # one infinite gradient entry, finite statistics
        F.cross_entropy(faulty(x), y).backward()
        faulty[2].weight.grad[0, 0] = math.inf
    opt_faulty.step()

    assert opt_faulty.metrics() == {"steps": position + 1, "skipped_steps": 1}
    new_params, new_momentum, new_factors = _full_state(faulty, opt_faulty)
    for a, b in zip(params, new_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(momentum, new_momentum, strict=True):
        for key in a:  # a first skipped step may create zero state; it must not move it
            assert torch.equal(a[key], b[key]), key
        assert all(not v.any() for k, v in b.items() if k not in a), b
    if position:
        assert_same_curvature(new_factors, factors)

    # training continues as if the bad batch had never been there
    train(faulty, opt_faulty, batches[position:])
    assert opt_faulty.metrics() == {"steps": 5, "skipped_steps": 1}
    assert all(torch.isfinite(p).all() for p in faulty.parameters())
    assert_params_equal(faulty, clean)
    assert_same_curvature(opt_faulty.curvature_state, opt_clean.curvature_state)


# -- curvature interval -------------------------------------------------------------------------
def test_curvature_interval_gates_statistics():
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=1e-2, curvature_interval=3)
    flags, changed = [], []
    previous = curvature_snapshot(opt)
    for x, y in vector_batches(7):
        flags.append(opt.is_curvature_step)
        one_step(model, opt, x, y)
        now = curvature_snapshot(opt)
        changed.append(
            set(now) != set(previous)
            or any(not torch.equal(now[n][k], previous[n][k]) for n in now for k in ("H", "S"))
        )
        previous = now
    assert flags == [True, False, False, True, False, False, True]
    assert changed == flags
    assert opt.is_curvature_step is False  # 7 steps taken: the next is step 7, 7 % 3 != 0


def test_default_curvature_interval_per_variant():
    assert curvlab.AdaFisher(mlp()).curvature_interval == 1
    assert curvlab.AdaFisher(mlp(), variant="official").curvature_interval == 100
    assert (
        curvlab.AdaFisher(mlp(), variant="official", curvature_interval=7).curvature_interval == 7
    )


# -- argument validation ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [curvlab.AdaFisher, curvlab.AdaFisherW])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(gamma=1.0), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1e-3), "damping"),
        (dict(variant="nope"), "variant"),
        (dict(curvature_interval=0), "curvature_interval"),
        (dict(curvature_interval=-2), "curvature_interval"),
        (dict(beta=1.0), "beta"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(ema="nope"), "ema"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(mlp(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        curvlab.AdaFisher(list(mlp().parameters()))


@pytest.mark.parametrize(
    "kwargs, kind, known",
    [
        (dict(estimator="nope"), "estimators", "diagonal"),
        (dict(normalizer="nope"), "normalizers", "minmax"),
        (dict(update_rule="nope"), "updates", "adafisher"),
        (dict(reducer="nope"), "reducers", "none"),
        (dict(backend="nope"), "backends", "native"),
        (dict(damping="nope"), "damping", "constant"),
        (dict(adapters=["linear", "nope"]), "adapters", "conv2d"),
    ],
)
def test_unknown_plugin_names_list_the_registered_ones(kwargs, kind, known):
    with pytest.raises(UnknownPluginError) as info:
        curvlab.AdaFisher(mlp(), **kwargs)
    message = str(info.value)
    assert "'nope'" in message
    for name in curvlab.registered(kind):
        assert name in message
    assert known in curvlab.registered(kind)
    assert isinstance(info.value, KeyError)


class OnlyRootParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def test_model_without_supported_layer():
    with pytest.raises(ValueError, match="allow_no_supported_layer"):
        curvlab.AdaFisher(OnlyRootParameter())
    # frozen supported layers do not count
    frozen = nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.PReLU())
    with pytest.raises(ValueError, match="allow_no_supported_layer"):
        curvlab.AdaFisher(frozen)

    model = OnlyRootParameter()
    with pytest.warns(CurvatureFallbackWarning):
        opt = curvlab.AdaFisher(model, lr=1e-2, damping=LAM, allow_no_supported_layer=True)
    before = params_of(model)
    train(model, opt, vector_batches(2))
    assert not torch.equal(before[0], model.w)
    assert [f.name for f in opt.fallback_parameters()] == ["w"]
    assert torch.equal(opt.preconditioner(model.w), torch.full_like(model.w, 1 + LAM))


def test_repr():
    text = repr(curvlab.AdaFisher(mlp(), damping=2e-3))
    assert text.startswith("AdaFisher(")
    for part in ("LinearAdapter", "ConstantDamping(value=0.002", "ema='paper'", "gamma=0.8"):
        assert part in text
    assert repr(curvlab.AdaFisherW(mlp())).startswith("AdaFisherW(")
    assert "ema='official'" in repr(curvlab.AdaFisher(mlp(), variant="official"))
