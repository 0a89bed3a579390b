"""Determinism on CPU (issue 8, item 8): the same seed gives bitwise-identical runs, another
seed a different one.

The seed drives everything random in a training run here: the initialisation, the
DataLoader's shuffling (its own generator) and dropout. The optimizer itself draws no random
numbers (checked), so seeding the model and the data is enough. Bitwise equality holds for one
machine, one torch build and one thread count (tests/conftest.py sets 1 thread).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab
from curvlab.config import CONFIG_ROOT

OPTIMIZERS = {
    "adafisher": lambda m: curvlab.AdaFisher(m, lr=1e-3),
    "adafisher_official": lambda m: curvlab.AdaFisher(
        m, lr=1e-3, variant="official", curvature_interval=2
    ),
    "kfac": lambda m: curvlab.build_optimizer(
        m, CONFIG_ROOT / "kfac.gin", bindings=["optimizer.inverse_interval = 3"]
    ),
    "banded": lambda m: curvlab.build_optimizer(m, CONFIG_ROOT / "banded_adafisher.gin"),
}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * 6 * 6, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)  # fixed data; the seed under test only shuffles
    x = torch.randn(40, 1, 6, 6, generator=g)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long())


def run(name: str, seed: int, epochs: int = 2) -> dict:
    torch.manual_seed(seed)
    model = make_model()
    opt = OPTIMIZERS[name](model)
    loader = DataLoader(
        dataset(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return {
        "losses": torch.stack(losses),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "curvature": {
            f"{n}.{k}": v.clone() for n, s in opt.curvature_state.items() for k, v in s.items()
        },
        "state": {
            f"{i}.{k}": v.clone()
            for i, p in enumerate(model.parameters())
            for k, v in opt.state[p].items()
        },
    }


def assert_identical(a: dict, b: dict) -> None:
    for part in ("losses", "model", "curvature", "state"):
        x, y = a[part], b[part]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), part
            continue
        assert set(x) == set(y), part
        for key in x:
            assert torch.equal(x[key], y[key]), f"{part}: {key}"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_same_seed_gives_bitwise_identical_runs(name):
    first = run(name, seed=0)
    torch.manual_seed(12345)  # disturb the global RNG in between: the run reseeds it
    torch.rand(100)
    second = run(name, seed=0)
    assert first["curvature"] and first["state"]
    assert_identical(first, second)


@pytest.mark.parametrize("name", ["adafisher", "kfac"])
def test_different_seeds_give_different_runs(name):
    a, b = run(name, seed=0, epochs=1), run(name, seed=1, epochs=1)
    assert not torch.equal(a["losses"], b["losses"])
    for key in a["model"]:
        if a["model"][key].is_floating_point() and key.endswith("weight"):
            assert not torch.equal(a["model"][key], b["model"][key]), key
    assert any(not torch.equal(a["curvature"][k], b["curvature"][k]) for k in a["curvature"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_optimizer_draws_no_random_numbers(name):
    torch.manual_seed(0)
    model = make_model()
    opt = OPTIMIZERS[name](model)
    x, y = dataset().tensors
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[:8]), y[:8]).backward()
        state = torch.get_rng_state()  # dropout drew in the forward; step() must not draw
        opt.step()
        assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["adafisher", "kfac"])
def test_deterministic_algorithms_mode_runs_and_changes_nothing(name):
    reference = run(name, seed=0, epochs=1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = run(name, seed=0, epochs=1)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_identical(reference, strict)
