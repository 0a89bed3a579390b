"""Optimizer state moves between a model and its wrapped forms (canonical layer names).

``torch.optim`` state is keyed by parameter position, so it moves freely between
``torch.compile(m)``, ``DistributedDataParallel(m)`` and ``m``; curvlab's per-layer factors are
keyed by layer name, which must therefore not carry the wrappers' ``_orig_mod.`` / ``module.``
levels (curvlab/naming.py).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn import functional as F

import curvlab
from curvlab.naming import canonical_named_modules, unwrap
from curvlab.plugins.adapters import normalization

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(8, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n)
    ]


def saved(state: dict) -> dict:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint
    carries it (loading a live ``state_dict()`` directly would share its tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_canonical_names_ignore_wrappers() -> None:
    model = make_model()
    plain = [name for name, _ in canonical_named_modules(model)]
    compiled = torch.compile(model)
    assert [name for name, _ in canonical_named_modules(compiled)] == plain
    assert unwrap(compiled) is model
    # a wrapper deeper in the tree (activation checkpointing of one block) is elided too
    nested = make_model()
    nested[4] = checkpoint_wrapper(nested[4])
    assert [name for name, _ in canonical_named_modules(nested)] == plain
    # a user's child that happens to be called "module" is a real level, not a wrapper
    holder = nn.Module()
    holder.module = nn.Linear(2, 2)
    assert [n for n, _ in canonical_named_modules(holder)] == ["", "module"]


def test_layer_names_and_state_keys_match_between_wrapped_and_plain() -> None:
    model = make_model()
    names = [r.name for r in curvlab.AdaFisher(make_model()).layers]
    assert names == ["0", "1", "4", "5", "7"]
    assert [r.name for r in curvlab.AdaFisher(torch.compile(model)).layers] == names
    wrapped = make_model()
    wrapped[4] = checkpoint_wrapper(wrapped[4])
    assert [r.name for r in curvlab.AdaFisher(wrapped).layers] == names


@pytest.mark.slow
def test_state_of_a_compiled_model_continues_in_the_plain_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Save from ``AdaFisher(torch.compile(m))``, load into ``AdaFisher(m2)``: the next steps
    match the compiled run's (float32; compiled kernels round differently, hence 1e-6).

    BatchNorm's H is read from the batch statistics the eager forward saved, and recomputed
    for a compiled model (no native autograd node): two roundings that min-max then stretches
    (docs/math.md); both sides recompute here, as tests/test_compile.py does."""
    monkeypatch.setattr(normalization, "READ_SAVED_BATCH_STATS", False)
    torch._dynamo.reset()
    data = batches(6)
    compiled_base = make_model()
    compiled = torch.compile(compiled_base, backend="aot_eager")
    opt = curvlab.AdaFisher(compiled, lr=1e-2)
    for x, y in data[:3]:
        step(compiled, opt, x, y)
    model_state = {k: v.clone() for k, v in compiled_base.state_dict().items()}
    opt_state = saved(opt.state_dict())
    assert all(not k.startswith("_orig_mod") for k in opt_state["curvature"]["layers"])

    plain = make_model()
    plain.load_state_dict(model_state)
    plain_opt = curvlab.AdaFisher(plain, lr=1e-2)
    plain_opt.load_state_dict(opt_state)
    for x, y in data[3:]:
        step(compiled, opt, x, y)
        step(plain, plain_opt, x, y)
    for a, b in zip(compiled_base.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_state_of_the_plain_model_loads_into_a_wrapped_one() -> None:
    data = batches(4, torch.float64)
    a = make_model(torch.float64)
    opt_a = curvlab.AdaFisherW(a, lr=1e-2, weight_decay=1e-2)
    for x, y in data[:2]:
        step(a, opt_a, x, y)
    b = make_model(torch.float64)
    b.load_state_dict(a.state_dict())
    b[4] = checkpoint_wrapper(b[4])
    opt_b = curvlab.AdaFisherW(b, lr=1e-2, weight_decay=1e-2)
    opt_b.load_state_dict(saved(opt_a.state_dict()))
    for x, y in data[2:]:
        step(a, opt_a, x, y)
        step(b, opt_b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_different_architecture_is_still_refused() -> None:
    opt = curvlab.AdaFisher(make_model())
    other = make_model()
    other[7] = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="saved for different layers"):
        curvlab.AdaFisher(other).load_state_dict(opt.state_dict())


@pytest.mark.slow
def test_state_of_a_ddp_model_continues_in_the_plain_model(tmp_path: Path) -> None:
    """Two gloo ranks train ``AdaFisher(DDP(m))`` (each on half of every batch); the state rank 0
    saves after 3 steps loads into a plain model, which then trains on the whole batches and
    matches the ranks' next steps (float32, 1e-6)."""
    from tests.plugins.reducers.test_torch_distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._ddp_state_worker", str(tmp_path)],
            env=dict(env, RANK=str(rank)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    from tests._ddp_state_worker import batches as ddp_batches
    from tests._ddp_state_worker import make_model as ddp_model

    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in saved["optimizer"]["curvature"]["layers"])
    model = ddp_model()
    model.load_state_dict(saved["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvlab.AdaFisher(model, lr=1e-2)
    opt.load_state_dict(saved["optimizer"])
    for x, y in ddp_batches()[3:]:
        step(model, opt, x, y)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), final[name], rtol=0, atol=1e-6)
