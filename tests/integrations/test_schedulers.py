"""Learning-rate schedules move each param group's ``lr`` of a curvlab optimizer exactly as they
move ``torch.optim.SGD``'s, and the step uses the scheduled value (docs/integrations.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler

import curvlab

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def network() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def groups(model: nn.Module) -> list[dict]:
    """Two groups with different learning rates (the schedules act per group)."""
    return [
        {"params": list(model[0].parameters()), "lr": 1e-2},
        {"params": list(model[2].parameters()), "lr": 3e-3},
    ]


SCHEDULES = {
    "step": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-4),
    "lambda_per_group": lambda o: lr_scheduler.LambdaLR(
        o, [lambda t: 1.0 / (1 + t), lambda t: 0.9**t]
    ),
    "onecycle": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=[2e-2, 5e-3], total_steps=10, cycle_momentum=False
    ),
    "warmup_then_exponential": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.ExponentialLR(o, 0.8)],
        milestones=[3],
    ),
}


def lr_trace(opt: torch.optim.Optimizer, make, steps: int = 10) -> list[list[float]]:
    schedule = make(opt)
    trace = []
    for _ in range(steps):
        trace.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    return trace


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_torch_schedules_move_lr_like_sgd(name: str) -> None:
    model = network()
    ours = curvlab.AdaFisher(model, params=groups(model))
    sgd = torch.optim.SGD(groups(network()), lr=1.0)
    assert lr_trace(ours, SCHEDULES[name]) == lr_trace(sgd, SCHEDULES[name])


def test_hf_get_scheduler_moves_lr_like_sgd() -> None:
    transformers = pytest.importorskip("transformers")
    for kind in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"):

        def make(o, kind=kind):  # noqa: ANN001, ANN202
            return transformers.get_scheduler(kind, o, num_warmup_steps=2, num_training_steps=10)

        model = network()
        ours = curvlab.AdaFisherW(model, params=groups(model))
        assert lr_trace(ours, make) == lr_trace(torch.optim.SGD(groups(network())), make)


def test_the_step_uses_the_scheduled_lr() -> None:
    """A LambdaLR run equals a run that writes the same lr into the groups by hand."""
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (6,), generator=g),
        )
        for _ in range(6)
    ]
    factor = [lambda t: math.cos(t / 4), lambda t: 0.5**t]

    def train(scheduled: bool) -> nn.Module:
        model = network()
        opt = curvlab.AdaFisher(model, params=groups(model))
        base = [grp["lr"] for grp in opt.param_groups]
        schedule = lr_scheduler.LambdaLR(opt, factor) if scheduled else None
        for t, (x, y) in enumerate(batches):
            if not scheduled:
                for grp, lr, f in zip(opt.param_groups, base, factor):
                    grp["lr"] = lr * f(t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if schedule is not None:
                schedule.step()
        return model

    a, b = train(True), train(False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_reduce_on_plateau_and_scheduler_state_round_trip() -> None:
    model = network()
    opt = curvlab.AdaFisher(model, params=groups(model))
    plateau = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for loss in (1.0, 1.0, 1.0):
        opt.step()
        plateau.step(loss)
    assert [grp["lr"] for grp in opt.param_groups] == [2.5e-3, 7.5e-4]
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(2):
        opt.step()
        cosine.step()
    other_model = network()
    other = curvlab.AdaFisher(other_model, params=groups(other_model))
    other.load_state_dict(opt.state_dict())
    restored = lr_scheduler.CosineAnnealingLR(other, T_max=5)
    restored.load_state_dict(cosine.state_dict())
    for _ in range(3):
        for o, s in ((opt, cosine), (other, restored)):
            o.step()
            s.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in other.param_groups]


def test_one_cycle_momentum_needs_cycle_momentum_false() -> None:
    """AdaFisher's momentum is the group key ``beta`` (not ``momentum`` / ``betas``), which
    OneCycleLR cannot cycle: torch refuses with a clear message (documented)."""
    opt = curvlab.AdaFisher(network())
    with pytest.raises(ValueError, match="momentum"):
        lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
