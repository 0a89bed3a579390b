"""Reliability of the K-FAC and banded optimizers (configs/kfac.gin, configs/banded_adafisher.gin)
and of the Adam composition (configs/adam.gin): non-finite steps and gradient accumulation
(issue 8, items 2 and 3; the AdaFisher versions are in tests/test_optimizer_api.py).

Findings pinned down here (docs/reliability.md):

* a skipped step leaves parameters, momentum, factors *and the cached eigenbases* unchanged;
  but when the very first curvature step of a layer is skipped, K-FAC (inverse_interval = 10)
  caches the eigenbasis of the zero initial factor and keeps it until the next scheduled
  refresh (identity until the next refresh after an accepted update);
* skipped steps count in ``metrics()["steps"]`` and therefore shift the phase of
  ``inverse_interval`` / ``curvature_interval``;
* accumulation is exact for ``per_sample=False`` (banded's default; K-FAC when bound), but with
  K-FAC's ``per_sample=True`` each call's output gradient is multiplied by *that call's* batch
  size n_i, so k micro-batches with loss weights n_i/N give ``G = Σ_i (n_i/N)² · G_i`` (rows
  pooled): for equal micro-batches exactly ``G_whole / k²``. A is unaffected.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT
from curvlab.structures import dense_factor

CASES = {
    # name: (config, bindings)
    "kfac": ("kfac.gin", ()),  # inverse_interval = 10: eigenbases cached between refreshes
    "kfac_inverse_every_step": ("kfac.gin", ("optimizer.inverse_interval = 1",)),
    "banded": ("banded_adafisher.gin", ()),
    "adam": ("adam.gin", ()),
}


class NoBNConvNet(nn.Sequential):
    """Conv2d and Linear (K-FAC/banded factors) plus LayerNorm (diagonal factors); per-sample
    layers only, so that micro-batches see the same rows as the whole batch."""

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


def twins():
    torch.manual_seed(0)
    a = NoBNConvNet().double()
    b = NoBNConvNet().double()
    b.load_state_dict(a.state_dict())
    return a, b


def build(case: str, model: nn.Module, *extra: str):
    config, bindings = CASES[case]
    return curvlab.build_optimizer(model, CONFIG_ROOT / config, bindings=[*bindings, *extra])


def image_batches(n_batches=5, n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(n_batches)
    ]


def one_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def full_state(model, opt):
    """Parameters, per-parameter state (momentum, Adam's v and counts), factors, eigenbases."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        "curvature": {
            n: {k: v.clone() for k, v in s.items()} for n, s in opt.curvature_state.items()
        },
    }


def assert_equal_tree(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    else:
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")


# -- non-finite values ----------------------------------------------------------------------------
@pytest.mark.parametrize("position", [0, 3], ids=["first_step", "fourth_step"])
@pytest.mark.parametrize("where", ["input", "gradient", "statistic"])
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_step_is_skipped_and_changes_nothing(case, where, position):
    if where == "statistic" and case == "adam":
        pytest.skip("the Adam composition captures no layer statistics")
    clean, faulty = twins()
    opt_clean, opt_faulty = build(case, clean), build(case, faulty)
    batches = image_batches()
    for x, y in batches:
        one_step(clean, opt_clean, x, y)
    for x, y in batches[:position]:
        one_step(faulty, opt_faulty, x, y)

    before = full_state(faulty, opt_faulty)
    x, y = batches[position]
    opt_faulty.zero_grad(set_to_none=True)
    if where == "input":  # NaN gradients and NaN statistics
        x = x.clone()
        x[0, 0, 0, 0] = math.nan
        F.cross_entropy(faulty(x), y).backward()
    elif where == "gradient":  # one infinite gradient entry, finite statistics
        F.cross_entropy(faulty(x), y).backward()
        faulty[3].weight.grad[0, 0] = math.inf
    else:  # finite gradients, one infinite statistic (e.g. an overflowing input factor)
        F.cross_entropy(faulty(x), y).backward()
        record = opt_faulty._layer_by_name["3"]
        assert record.has_statistics
        record.input_total = record.input_total.clone()
        record.input_total.view(-1)[0] = math.inf
        assert all(torch.isfinite(p.grad).all() for p in faulty.parameters())
    opt_faulty.step()
    assert opt_faulty.metrics() == {"steps": position + 1, "skipped_steps": 1}

    after = full_state(faulty, opt_faulty)
    assert_equal_tree(before["params"], after["params"], "params")
    for i, (b, a) in enumerate(zip(before["state"], after["state"], strict=True)):
        for key in b:  # momentum, Adam's v and its step count
            assert torch.equal(b[key], a[key]), f"param {i} state {key!r} moved"
        for key in set(a) - set(b):  # a skipped first step may create zero state
            assert not a[key].any(), f"param {i} state {key!r} created non-zero"
    if position:
        # factors and the cached eigenbases (K-FAC: not a refresh step at position 3 unless
        # inverse_interval = 1, where the refresh recomputes them from the unchanged factors)
        assert_equal_tree(before["curvature"], after["curvature"], "curvature")
        if case != "adam":  # what the solver caches (eigenbases, inverses, blocks)
            keys = set(opt_faulty.kronecker_solver.state_keys)
            assert all(keys <= set(s) for n, s in after["curvature"].items() if n != "4")
    else:
        for name, state in after["curvature"].items():  # nothing accepted yet
            assert not bool(state["updated"]), name

    # training continues
    for x, y in batches[position:]:
        one_step(faulty, opt_faulty, x, y)
    assert opt_faulty.metrics() == {"steps": len(batches) + 1, "skipped_steps": 1}
    assert all(torch.isfinite(p).all() for p in faulty.parameters())
    if case == "kfac" and position == 0:
        return  # stale eigenbasis: test_skipped_first_step_does_not_leave_a_stale_eigenbasis
    # ... exactly as if the bad batch had never been there (no refresh phase shift within the
    # first 10 steps for inverse_interval = 10; none at all for inverse_interval = 1)
    for p, q in zip(faulty.parameters(), clean.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_equal_tree(
        full_state(faulty, opt_faulty)["curvature"], full_state(clean, opt_clean)["curvature"]
    )


@pytest.mark.parametrize("solver", ["inverse", "eigen"])
def test_skipped_first_step_never_preconditions_with_a_stale_eigenbasis(solver):
    """A skipped first curvature step leaves zero factors whose cached eigenbasis (eigh(0)) or
    inverse must not precondition: until the next refresh after an accepted update the layer
    uses identity factors (all normalised eigenvalues 1), then the refreshed factors'."""
    model, _ = twins()
    opt = build(
        "kfac", model, "optimizer.inverse_interval = 3", f"estimators.full.solver = {solver!r}"
    )
    assert opt.kronecker_solver.name == solver
    batches = image_batches(4)
    (x, y), (x2, y2) = batches[:2]
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    one_step(model, opt, bad, y)  # step 0: skipped (the refresh sees zero factors)
    one_step(model, opt, x2, y2)  # step 1: accepted, not a refresh step
    assert opt.metrics() == {"steps": 2, "skipped_steps": 1}
    lam = opt.damping.value(1)
    root = math.sqrt(lam)
    joint = [r for r in opt.layers if r.structure != "diagonal"]
    assert joint
    for record in joint:
        state = opt.curvature_state[record.name]
        assert bool(state["updated"])
        if solver == "eigen":
            assert not bool(state["eigen_valid"])
        else:  # identity factors damped with π = 1
            eye = torch.eye(state["H_inv"].shape[-1], dtype=torch.float64)
            torch.testing.assert_close(state["H_inv"][0], eye / (1 + root))
        F = opt.preconditioner(record.params["weight"])
        # factored damping of identity factors (π = 1): (1 + √λ)² on every entry
        torch.testing.assert_close(F, torch.full_like(F, (1 + root) ** 2))
    one_step(model, opt, *batches[2])  # step 2
    one_step(model, opt, *batches[3])  # step 3: refresh
    for record in joint:
        state = opt.curvature_state[record.name]
        H, S = (dense_factor(record.structure, state[k]) for k in ("H", "S"))
        if solver == "eigen":
            assert bool(state["eigen_valid"])
            for key, M in (("H", H), ("S", S)):
                values = torch.linalg.eigvalsh(M)
                torch.testing.assert_close(state["L" + key], values, rtol=1e-8, atol=1e-12)
        else:  # the inverses of the factors with the π-split damping (identity normaliser)
            pi = torch.sqrt(
                H.diagonal(dim1=-2, dim2=-1).mean() / S.diagonal(dim1=-2, dim2=-1).mean()
            )
            for key, M, shift in (("H", H, pi * root), ("S", S, root / pi)):
                eye = torch.eye(M.shape[-1], dtype=M.dtype)
                expected = torch.linalg.inv(M + shift * eye)
                torch.testing.assert_close(state[key + "_inv"], expected, rtol=1e-9, atol=1e-12)


def test_skipped_steps_shift_the_inverse_interval_phase():
    """Documented: ``step()`` counts skipped steps too, so the eigenbasis refresh of K-FAC
    (every 3 steps here) happens one batch earlier after a skipped step."""
    model, _ = twins()
    opt = build("kfac", model, "optimizer.inverse_interval = 3")
    batches = image_batches(4)
    for x, y in batches[:2]:
        one_step(model, opt, x, y)  # steps 0 (refresh), 1
    bad = batches[2][0].clone()
    bad[0, 0, 0, 0] = math.nan
    one_step(model, opt, bad, batches[2][1])  # step 2: skipped
    key = opt.kronecker_solver.state_keys[0]  # the solver's cache (K-FAC: the inverse of H')
    cached = {n: s[key].clone() for n, s in opt.curvature_state.items() if key in s}
    assert cached
    one_step(model, opt, *batches[2])  # step 3 = a refresh step, on the third batch
    assert opt.metrics() == {"steps": 4, "skipped_steps": 1}
    assert any(not torch.equal(opt.curvature_state[n][key], q) for n, q in cached.items())


def test_kfac_state_does_not_load_into_a_banded_optimizer():
    model, other = twins()
    opt = build("kfac", model)
    one_step(model, opt, *image_batches(1)[0])
    with pytest.raises(ValueError, match="different layers"):
        build("banded", other).load_state_dict(opt.state_dict())


# -- gradient accumulation -----------------------------------------------------------------------
def accumulate_step(model, opt, x, y, sizes):
    """k micro-batches, each loss weighted by its share n_i / N (= 1/k for equal sizes)."""
    opt.zero_grad(set_to_none=True)
    for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
        (F.cross_entropy(model(xs), ys) * (len(ys) / len(y))).backward()
    opt.step()


@pytest.mark.parametrize("sizes", [(4, 4, 4), (6, 5, 1)], ids=["equal", "unequal"])
@pytest.mark.parametrize(
    "case, bindings",
    [
        ("banded", ()),  # per_sample=False is banded's default
        ("kfac_inverse_every_step", ("estimators.full.per_sample = False",)),
    ],
    ids=["banded", "kfac_per_sample_false"],
)
def test_gradient_accumulation_equals_the_concatenated_batch(case, bindings, sizes):
    whole, accumulated = twins()
    opt_whole = build(case, whole, *bindings)
    opt_acc = build(case, accumulated, *bindings)
    assert opt_whole.estimator.per_sample is False
    for x, y in image_batches(2, n=12):
        one_step(whole, opt_whole, x, y)
        accumulate_step(accumulated, opt_acc, x, y, sizes)
        for name, state in opt_whole.curvature_state.items():
            for key in ("H", "S"):
                torch.testing.assert_close(
                    opt_acc.curvature_state[name][key], state[key], rtol=1e-10, atol=1e-12
                )
        for p, q in zip(accumulated.parameters(), whole.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(
                opt_acc.preconditioner(p), opt_whole.preconditioner(q), rtol=1e-8, atol=1e-12
            )


@pytest.mark.parametrize("sizes", [(4, 4, 4), (6, 5, 1)], ids=["equal", "unequal"])
def test_kfac_per_sample_accumulation_scales_G_by_the_squared_loss_weights(sizes):
    """K-FAC with ``per_sample=True`` (configs/kfac.gin): each call's output gradient is
    multiplied by that call's batch size n_i, so with loss weights n_i/N the captured rows are
    (n_i/N)·(per-sample gradient) and G = Σ_i (n_i/N)² Σ_{rows of i} g gᵀ / R. For k equal
    micro-batches that is G_whole / k²; A is the whole-batch A. The step therefore differs
    from the whole-batch step (documented limit: use per_sample=False to accumulate exactly)."""
    gamma0 = "optimizer.gamma = 0.0"  # the state is this step's statistic
    x, y = image_batches(1, n=12)[0]
    whole, accumulated = twins()
    opt_whole = build("kfac", whole, gamma0)
    opt_acc = build("kfac", accumulated, gamma0)
    assert opt_whole.estimator.per_sample is True
    one_step(whole, opt_whole, x, y)
    accumulate_step(accumulated, opt_acc, x, y, sizes)

    # each micro-batch on its own (per-sample G_i of its rows), from the same initial model
    parts = []
    for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
        single, _ = twins()
        opt_single = build("kfac", single, gamma0)
        one_step(single, opt_single, xs, ys)
        parts.append((len(ys), opt_single.curvature_state))

    N = len(y)
    for name, state in opt_whole.curvature_state.items():
        acc = opt_acc.curvature_state[name]
        torch.testing.assert_close(acc["H"], state["H"], rtol=1e-10, atol=1e-12)
        # rows per call are proportional to n_i (same positions per sample)
        expected = sum((n / N) ** 2 * (n / N) * s[name]["S"] for n, s in parts)
        torch.testing.assert_close(acc["S"], expected, rtol=1e-10, atol=1e-14)
        if len(set(sizes)) == 1:
            k = len(sizes)
            torch.testing.assert_close(acc["S"], state["S"] / k**2, rtol=1e-10, atol=1e-14)
        else:
            assert not torch.allclose(acc["S"], state["S"])
    assert any(
        not torch.allclose(p, q, rtol=1e-6, atol=0.0)
        for p, q in zip(accumulated.parameters(), whole.parameters(), strict=True)
    )


# -- finite but huge gradients -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, 1e36])
@pytest.mark.parametrize(
    "case, bindings",
    [
        ("kfac", ()),  # the KL clip sums d·g in fp64: no overflow into a NaN ν
        ("kfac", ("updates.kfac.kl_clip = None",)),
        ("banded", ()),
    ],
    ids=["kfac", "kfac_without_kl_clip", "banded"],
)
def test_huge_finite_gradients_never_write_non_finite_values(case, bindings, scale):
    """A diverging run: finite fp32 gradients of magnitude up to ~1e36. Either the step is
    applied with a finite result or it is skipped; parameters and momentum stay finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = build(case, model, *bindings)
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
        for key, value in opt.state[p].items():
            assert torch.isfinite(value).all(), f"non-finite {key}"


def test_gradient_whose_norm_overflows_is_skipped_not_absorbed():
    """A finite fp32 gradient beyond ~1.8e19 squares to inf: torch.optim.Adam would make v inf
    for good (those entries never move again). curvlab's finite flag is a multi-tensor L2 norm,
    which overflows there too, so the step is skipped and counted instead; the Adam composition
    then equals torch.optim.Adam run without that batch (to fp32 rounding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    reference = nn.Sequential(nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    opt = build("adam", model)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    for i in range(3):
        pairs = ((model, opt),) if i == 0 else ((model, opt), (reference, ref_opt))
        for m, o in pairs:
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            if i == 0:
                for p in m.parameters():
                    p.grad.mul_(1e30)
            o.step()
    assert opt.metrics()["skipped_steps"] == 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)  # fp32 rounding
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["curvature"]).all()
        torch.testing.assert_close(opt.state[p]["curvature"], ref_opt.state[q]["exp_avg_sq"])
