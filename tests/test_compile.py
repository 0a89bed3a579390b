"""``torch.compile`` of the model keeps curvlab's hooks working (issue 7, item 2), on CPU.

What happens (torch 2.13): dynamo inlines the modules' forward hooks into the compiled graph
(the input statistic is traced with the layer) and guards on the optimizer's capture flags, so
curvature / non-curvature steps, ``pause_capture()`` and ``eval()`` each get their own graph;
the output-tensor hook mutates the layer's record, which dynamo cannot trace: that is one graph
break, and the hook runs eagerly in the backward pass. Hence ``fullgraph=True`` fails loudly
(nothing is silently dropped), and the default mode gives the eager factors and updates.

``aot_eager`` (dynamo + AOTAutograd, no code generation) runs in seconds and must match eager to
float32 round-off; inductor (C++ code generation: tens of seconds on 2 cores) is checked once on
the MLP, marked slow, to 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.plugins.adapters import normalization

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 4),
    )


def batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g) if kind == "mlp" else torch.randn(6, 3, 6, 6, generator=g)
    return x, torch.randint(0, 4, (6,), generator=g)


def train(base: nn.Module, kind: str, backend: str | None, order: str, steps: int, interval: int):
    """``steps`` AdaFisher steps; returns (model, optimizer, factors after each step).

    order "after": AdaFisher(model) then torch.compile(model); "before": the optimizer gets the
    compiled module (its layers appear under ``_orig_mod.``)."""
    model = copy.deepcopy(base)
    x, y = batch(kind)
    if backend is not None and order == "before":
        net = torch.compile(model, backend=backend)
        opt = curvlab.AdaFisher(net, lr=1e-2, curvature_interval=interval)
    else:
        opt = curvlab.AdaFisher(model, lr=1e-2, curvature_interval=interval)
        net = torch.compile(model, backend=backend) if backend is not None else model
    history = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        history.append(
            {
                k.removeprefix("_orig_mod."): (v["H"].clone(), v["S"].clone())
                for k, v in opt.curvature_state.items()
            }
        )
    return model, opt, history


def assert_same(eager, compiled, rtol: float, atol: float) -> None:
    (m1, o1, h1), (m2, o2, h2) = eager, compiled
    assert len(o2.layers) == len(o1.layers) > 0
    for step, (a, b) in enumerate(zip(h1, h2, strict=True)):
        assert a.keys() == b.keys(), f"step {step}: layers with factors differ"
        for name in a:
            for f1, f2 in zip(a[name], b[name]):
                torch.testing.assert_close(f2, f1, rtol=rtol, atol=atol, msg=f"{name} step {step}")
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_compiled_model_gives_eager_factors_and_updates(kind, order, monkeypatch):
    # eager BatchNorm hooks read the batch statistics the forward saved; a compiled model
    # hides them, so its hooks recompute them (equal to rounding, tests/test_fast_paths.py).
    # Min-max normalisation magnifies that rounding in BatchNorm's H (all entries ≈ 1), so
    # compare like with like: the recomputation on both sides
    monkeypatch.setattr(normalization, "READ_SAVED_BATCH_STATS", False)
    torch.manual_seed(0)
    base = mlp() if kind == "mlp" else cnn()
    # interval 2: the capture flag flips between steps, and the compiled graphs must follow it
    eager = train(base, kind, None, order, steps=4, interval=2)
    compiled = train(base, kind, "aot_eager", order, steps=4, interval=2)
    assert len(compiled[2][0]) == len(compiled[1].layers)  # every layer captured
    assert_same(eager, compiled, rtol=1e-5, atol=1e-7)


def test_compiled_model_respects_pause_and_eval():
    torch.manual_seed(0)
    model = cnn()
    opt = curvlab.AdaFisher(model, lr=1e-2)
    net = torch.compile(model, backend="aot_eager")
    x, y = batch("cnn")
    F.cross_entropy(net(x), y).backward()  # captured
    assert all(r.has_statistics for r in opt.layers)
    opt.step()
    opt.zero_grad()
    with opt.pause_capture():
        F.cross_entropy(net(x), y).backward()
    assert not any(r.has_statistics for r in opt.layers)
    model.eval()
    F.cross_entropy(net(x), y).backward()
    assert not any(r.has_statistics for r in opt.layers)
    model.train()
    F.cross_entropy(net(x), y).backward()
    assert all(r.has_statistics for r in opt.layers)


def test_fullgraph_fails_loudly_at_the_output_hook():
    """The output-tensor hook is a graph break: ``fullgraph=True`` raises instead of dropping it."""
    torch.manual_seed(0)
    model = mlp()
    opt = curvlab.AdaFisher(model, lr=1e-2)  # kept alive: a dropped optimizer unhooks
    net = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = batch("mlp")
    with pytest.raises(Exception, match="(?i)side effect|graph break|unsupported"):
        F.cross_entropy(net(x), y).backward()
    assert opt.layers


@pytest.mark.slow
def test_inductor_matches_eager_mlp():
    """Inductor generates its own kernels (reduction order may differ): 1e-5 over two steps."""
    torch.manual_seed(0)
    base = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = train(base, "mlp", None, "after", steps=2, interval=1)
        compiled = train(base, "mlp", "inductor", "after", steps=2, interval=1)
    assert_same(eager, compiled, rtol=1e-5, atol=1e-6)
