"""Hook lifecycle: close(), context manager, weak references, one live optimizer per layer."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import curvlab
from curvlab import OptimizerReplacedWarning


def hook_count(model: nn.Module) -> int:
    """Every module hook on the model, and any instance-level forward override."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        + ("forward" in m.__dict__)
        for m in model.modules()
    )


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_close_removes_every_hook_and_is_idempotent() -> None:
    model = make_model()
    before = hook_count(model)
    opt = curvlab.AdaFisher(model)
    # Linear, LayerNorm, Linear; and the buffer guard's pre-hook on the model
    assert hook_count(model) == before + 3 + 1
    train_step(model, opt)
    opt.close()
    assert hook_count(model) == before
    assert opt.closed
    opt.close()  # idempotent
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="closed"):
        train_step(model, opt)
    assert opt.state_dict()["curvature"]["step"] == 1  # state stays readable


def test_context_manager_closes() -> None:
    model = make_model()
    with curvlab.AdaFisherW(model) as opt:
        assert hook_count(model) == 3 + 1
        train_step(model, opt)
    assert opt.closed and hook_count(model) == 0


def test_dropped_optimizer_is_collected_and_its_hooks_removed() -> None:
    model = make_model()
    opt = curvlab.AdaFisher(model)
    train_step(model, opt)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None, "the hooks must not keep the optimizer alive"
    assert hook_count(model) == 0
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()  # nothing left to fire


def test_hooks_reach_the_optimizer_only_weakly() -> None:
    """Before collection, a dropped optimizer's gate already answers False (no capture)."""
    model = make_model()
    opt = curvlab.AdaFisher(model)
    gate = opt._capture_gate
    assert gate() is True
    opt._finalizer.detach()  # keep the hooks, to look at the gate of a dead optimizer
    del opt
    gc.collect()
    assert gate() is False


def test_new_optimizer_on_the_same_model_replaces_the_old_one() -> None:
    model = make_model()
    old = curvlab.AdaFisher(model)
    train_step(model, old)
    with pytest.warns(OptimizerReplacedWarning, match="detached the earlier") as record:
        new = curvlab.AdaFisher(model, lr=1e-2)
    assert len([w for w in record if issubclass(w.category, OptimizerReplacedWarning)]) == 1
    assert old.closed and not new.closed
    assert hook_count(model) == 3 + 1  # exactly one optimizer's hooks
    with pytest.raises(RuntimeError, match="closed"):
        train_step(model, old)
    train_step(model, new)
    assert set(new.curvature_state) == {"0", "1", "3"}


def test_ten_recreations_leave_one_set_of_hooks_and_the_same_step() -> None:
    model = make_model()
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizerReplacedWarning)
        keep = [curvlab.AdaFisher(model) for _ in range(10)]  # all still referenced
    assert sum(o.closed for o in keep) == 9
    assert hook_count(model) == 3 + 1
    ref_opt = curvlab.AdaFisher(reference)
    for seed in range(3):
        train_step(model, keep[-1], seed)
        train_step(reference, ref_opt, seed)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_disjoint_layers_do_not_conflict() -> None:
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        first = curvlab.AdaFisher(model, params=model[0].parameters())
        second = curvlab.AdaFisher(model, params=model[3].parameters())
    assert not first.closed and not second.closed
    assert hook_count(model) == 2 + 2


def test_closed_optimizer_does_not_rehook_on_add_param_group() -> None:
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        opt = curvlab.AdaFisher(model, params=model[0].parameters())
    opt.close()
    opt.add_param_group({"params": list(model[3].parameters())})
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", ["backpack", "asdl"])
def test_close_removes_reference_backend_hooks(backend: str) -> None:
    pytest.importorskip(backend)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    before = hook_count(model)
    opt = curvlab.AdaFisher(model, backend=backend)
    assert hook_count(model) > before
    train_step(model, opt)
    opt.close()
    assert hook_count(model) == before


def test_close_and_collection_remove_functional_layer_overrides() -> None:
    """nn.MultiheadAttention is captured through a forward installed on the module: close()
    and garbage collection remove it like the hooks."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    assert hook_count(model) == 0
    opt = curvlab.AdaFisherW(model)
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    opt.close()
    assert hook_count(model) == 0
    opt = curvlab.AdaFisherW(model)
    assert hook_count(model) > 0
    del opt
    gc.collect()
    assert hook_count(model) == 0


def test_non_exclusive_optimizer_shares_the_layers() -> None:
    """A learning-rate-0 optimizer that only accumulates factors next to the training one
    (the analyses' "shadow"): neither replaces the other, both capture every step."""
    model = make_model()
    opt = curvlab.AdaFisher(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerReplacedWarning)
        shadow = curvlab.CurvatureOptimizer(model, lr=0.0, estimator="full", exclusive=False)
    assert not opt.closed and not shadow.closed
    assert hook_count(model) == 2 * (3 + 1)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        shadow.zero_grad()
        F.cross_entropy(model(x), y).backward()
        shadow.step()
        opt.step()
    assert set(shadow.curvature_state) == set(opt.curvature_state) == {"0", "1", "3"}
    shadow.close()
    assert hook_count(model) == 3 + 1 and not opt.closed
    # a later exclusive optimizer replaces the exclusive owner
    with pytest.warns(OptimizerReplacedWarning):
        curvlab.AdaFisher(model)
    assert opt.closed
