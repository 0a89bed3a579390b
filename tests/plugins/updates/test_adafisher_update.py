"""AdaFisher / AdaFisherW update rules with a known F, and the two optimizers side by side.

AdaFisher:   m ← βm + (1−β)(g + κθ);  θ ← θ − α·m̂/F
AdaFisherW:  m ← βm + (1−β)g;         θ ← θ − α·(m̂/F + κθ)          (m̂ = m/(1−β^t))

From the same state (m₀, t−1) the one-step difference is
θ_AdaFisher − θ_AdaFisherW = ακθ·(1 − (1−β)/((1−β^t)·F)),  = ακθ(1 − 1/F) at t = 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.interfaces.update import Preconditioner
from curvlab.plugins.updates.adafisher import AdaFisherUpdate, AdaFisherWUpdate

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FixedF(Preconditioner):
    """A known diagonal F per parameter."""

    def __init__(self, Fs: dict[int, torch.Tensor]):
        self.Fs = Fs

    def dense_diagonal(self, param):
        return self.Fs[id(param)]

    def solve(self, params, tensors, power=1.0):
        return [t / self.Fs[id(p)] ** power for p, t in zip(params, tensors, strict=True)]


def one_step(rule, params, grads, states, Fs, lr, beta, wd, ok=True):
    group = {"lr": lr, "beta": beta, "weight_decay": wd, "params": params}
    rule.update([(group, params, grads, states)], FixedF(Fs), torch.tensor(ok))


def setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = [torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(5, generator=gen, dtype=DT)]
    grads = [torch.randn_like(t) for t in theta]
    Fs = {id(t): torch.rand(t.shape, generator=gen, dtype=DT) + 1e-3 for t in theta}
    return theta, grads, Fs


@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaFisher", "AdaFisherW"])
def test_three_steps_by_hand(decoupled):
    lr, beta, wd = 0.01, 0.9, 0.3
    rule = AdaFisherWUpdate() if decoupled else AdaFisherUpdate()
    theta, _, Fs = setup()
    states = [rule.init_state(t) for t in theta]
    ref = [t.clone() for t in theta]
    m = [torch.zeros_like(t) for t in theta]
    gen = torch.Generator().manual_seed(5)
    for t in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) for p in theta]
        for i, p in enumerate(ref):
            g = grads[i] if decoupled else grads[i] + wd * p
            m[i] = beta * m[i] + (1 - beta) * g
            mhat = m[i] / (1 - beta**t)
            step = mhat / Fs[id(theta[i])] + (wd * p if decoupled else 0.0)
            ref[i] = p - lr * step
        one_step(rule, theta, grads, states, Fs, lr, beta, wd)
        for a, b in zip(theta, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for s, mm in zip(states, m, strict=True):
        torch.testing.assert_close(s["exp_avg"], mm, rtol=1e-13, atol=1e-15)
        assert float(s["step"]) == 3.0


def test_first_step_with_known_F():
    """t = 1 from zero: m̂ = g (+κθ), so θ₁ = θ − α(g + κθ)/F (AdaFisher) and
    θ₁ = θ − α(g/F + κθ) (AdaFisherW)."""
    lr, beta, wd = 0.05, 0.9, 0.2
    theta = [torch.tensor([1.0, -2.0, 0.5], dtype=DT)]
    g = [torch.tensor([0.3, 0.1, -0.4], dtype=DT)]
    Fv = torch.tensor([2.0, 0.5, 1e-3], dtype=DT)
    a = [theta[0].clone()]
    one_step(
        AdaFisherUpdate(),
        a,
        [g[0].clone()],
        [AdaFisherUpdate().init_state(a[0])],
        {id(a[0]): Fv},
        lr,
        beta,
        wd,
    )
    w = [theta[0].clone()]
    one_step(
        AdaFisherWUpdate(),
        w,
        [g[0].clone()],
        [AdaFisherWUpdate().init_state(w[0])],
        {id(w[0]): Fv},
        lr,
        beta,
        wd,
    )
    # numbers written out
    want_a = torch.tensor(
        [
            1.0 - 0.05 * (0.3 + 0.2) / 2.0,
            -2.0 - 0.05 * (0.1 - 0.4) / 0.5,
            0.5 - 0.05 * (-0.4 + 0.1) / 1e-3,
        ],
        dtype=DT,
    )
    want_w = torch.tensor(
        [
            1.0 - 0.05 * (0.3 / 2.0 + 0.2),
            -2.0 - 0.05 * (0.1 / 0.5 - 0.4),
            0.5 - 0.05 * (-0.4 / 1e-3 + 0.1),
        ],
        dtype=DT,
    )
    torch.testing.assert_close(a[0], want_a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(w[0], want_w, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        a[0] - w[0], lr * wd * theta[0] * (1 - 1 / Fv), rtol=1e-11, atol=1e-15
    )


@pytest.mark.parametrize("t_before", [0, 1, 4])
def test_difference_from_the_same_state_is_closed_form(t_before):
    lr, beta, wd = 0.02, 0.85, 0.1
    theta, grads, Fs0 = setup(1)
    gen = torch.Generator().manual_seed(2)
    m0 = [torch.randn(t.shape, generator=gen, dtype=DT) * (t_before > 0) for t in theta]
    results = {}
    for name, rule in (("A", AdaFisherUpdate()), ("W", AdaFisherWUpdate())):
        params = [t.clone() for t in theta]
        states = []
        for p, mm in zip(params, m0, strict=True):
            s = rule.init_state(p)
            s["exp_avg"].copy_(mm)
            s["step"].fill_(t_before)
            states.append(s)
        Fs = {id(p): Fs0[id(t)] for p, t in zip(params, theta, strict=True)}
        one_step(rule, params, [g.clone() for g in grads], states, Fs, lr, beta, wd)
        results[name] = params
    t = t_before + 1
    for i, th in enumerate(theta):
        Fv = Fs0[id(th)]
        want = lr * wd * th * (1 - (1 - beta) / ((1 - beta**t) * Fv))
        torch.testing.assert_close(results["A"][i] - results["W"][i], want, rtol=1e-9, atol=1e-14)


def test_square_root_ablation_power_half():
    lr, beta = 0.1, 0.9
    theta, grads, Fs = setup(3)
    ref = [t - lr * g / Fs[id(t)].sqrt() for t, g in zip(theta, grads, strict=True)]
    rule = AdaFisherUpdate(power=0.5)
    one_step(rule, theta, grads, [rule.init_state(t) for t in theta], Fs, lr, beta, 0.0)
    for a, b in zip(theta, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "rule",
    [
        AdaFisherUpdate(),
        AdaFisherWUpdate(),
    ],
    ids=["A", "W"],
)
def test_skipped_step_changes_nothing(rule):
    theta, grads, Fs = setup(4)
    states = [rule.init_state(t) for t in theta]
    one_step(rule, theta, grads, states, Fs, 0.1, 0.9, 0.1)  # one real step first
    before = [t.clone() for t in theta]
    m_before = [s["exp_avg"].clone() for s in states]
    bad = [torch.full_like(g, float("nan")) for g in grads]
    one_step(rule, theta, bad, states, Fs, 0.1, 0.9, 0.1, ok=False)
    for t, b, s, mb in zip(theta, before, states, m_before, strict=True):
        assert torch.equal(t, b)
        assert torch.equal(s["exp_avg"], mb)
        assert float(s["step"]) == 1.0


@pytest.mark.parametrize("rule", [AdaFisherUpdate(), AdaFisherWUpdate()], ids=["A", "W"])
def test_skipped_step_without_weight_decay_changes_nothing(rule):
    theta, grads, Fs = setup(4)
    states = [rule.init_state(t) for t in theta]
    one_step(rule, theta, grads, states, Fs, 0.1, 0.9, 0.0)
    before = [t.clone() for t in theta]
    m_before = [s["exp_avg"].clone() for s in states]
    bad = [torch.full_like(g, float("nan")) for g in grads]
    one_step(rule, theta, bad, states, Fs, 0.1, 0.9, 0.0, ok=False)
    for t, b, s, mb in zip(theta, before, states, m_before, strict=True):
        assert torch.equal(t, b) and torch.equal(s["exp_avg"], mb)
        assert float(s["step"]) == 1.0


def test_skipped_step_with_coupled_weight_decay_end_to_end():
    """Through the optimizer: a NaN gradient is skipped and m does not move by (1−β)κθ."""
    m = nn.Linear(3, 2).double()
    opt = curvlab.AdaFisher(m, weight_decay=0.1)
    x = torch.randn(4, 3, dtype=DT)
    m(x).pow(2).mean().backward()
    opt.step()
    before = opt.state[m.weight]["exp_avg"].clone()
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    m.weight.grad.fill_(float("nan"))
    opt.step()
    assert opt.metrics()["skipped_steps"] == 1
    assert torch.equal(opt.state[m.weight]["exp_avg"], before)


# ---------------------------------------------------------------------------------------------
# the two optimizers, end to end
# ---------------------------------------------------------------------------------------------
def net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 16, 4),
        nn.LayerNorm(4),
        nn.Linear(4, 3),
    ).double()


def batches(n=5):
    gen = torch.Generator().manual_seed(11)
    return [
        (torch.randn(6, 2, 4, 4, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(n)
    ]


def train(model, opt, data, before_step=None):
    traj = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        old = [p.detach().clone() for p in model.parameters()]
        if before_step is not None:
            before_step(model)
        opt.step()
        traj.append((old, [p.detach().clone() for p in model.parameters()]))
    return traj


def test_without_weight_decay_the_trajectories_are_bitwise_identical():
    m1 = net()
    m2 = copy.deepcopy(m1)
    data = batches()
    t1 = train(m1, curvlab.AdaFisher(m1, lr=2e-3), data)
    t2 = train(m2, curvlab.AdaFisherW(m2, lr=2e-3), data)
    for (_, a), (_, b) in zip(t1, t2, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(t1[-1][1][0], t1[0][0][0])  # it moved


def test_adafisher_weight_decay_is_l2_added_to_the_gradient():
    kappa, lr = 0.05, 2e-3
    m1 = net()
    m2 = copy.deepcopy(m1)
    data = batches()
    t1 = train(m1, curvlab.AdaFisher(m1, lr=lr, weight_decay=kappa), data)

    def add_l2(model):
        for p in model.parameters():
            p.grad.add_(p.detach(), alpha=kappa)

    t2 = train(m2, curvlab.AdaFisher(m2, lr=lr), data, before_step=add_l2)
    for (_, a), (_, b) in zip(t1, t2, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def test_adafisherw_weight_decay_is_decoupled_shrinkage():
    """Each AdaFisherW(κ) step = an AdaFisher(0) step from the same state, then θ −= ακθ_old.
    Checked step by step: both optimizers are driven on the same parameters."""
    kappa, lr = 0.05, 2e-3
    mw = net()
    ma = copy.deepcopy(mw)
    opt_w = curvlab.AdaFisherW(mw, lr=lr, weight_decay=kappa)
    opt_a = curvlab.AdaFisher(ma, lr=lr)
    for x, y in batches():
        with torch.no_grad():
            for pa, pw in zip(ma.parameters(), mw.parameters(), strict=True):
                pa.copy_(pw)
        old = [p.detach().clone() for p in mw.parameters()]
        for model, opt in ((mw, opt_w), (ma, opt_a)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        for pw, pa, o in zip(mw.parameters(), ma.parameters(), old, strict=True):
            torch.testing.assert_close(pw, pa - lr * kappa * o, rtol=1e-12, atol=1e-15)


def test_one_step_difference_through_the_optimizers():
    kappa, lr = 0.1, 1e-3
    ma = net()
    mw = copy.deepcopy(ma)
    theta0 = [p.detach().clone() for p in ma.parameters()]
    x, y = batches(1)[0]
    opt_a = curvlab.AdaFisher(ma, lr=lr, weight_decay=kappa)
    opt_w = curvlab.AdaFisherW(mw, lr=lr, weight_decay=kappa)
    for model, opt in ((ma, opt_a), (mw, opt_w)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for pa, pw, t0 in zip(ma.parameters(), mw.parameters(), theta0, strict=True):
        Fa, Fw = opt_a.preconditioner(pa), opt_w.preconditioner(pw)
        assert torch.equal(Fa, Fw)  # the same curvature: weight decay does not enter F
        want = lr * kappa * t0 * (1 - 1 / Fa)
        torch.testing.assert_close(pa.detach() - pw.detach(), want, rtol=1e-9, atol=1e-15)
