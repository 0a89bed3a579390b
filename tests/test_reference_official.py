"""Independent reference for ``variant="official"`` (SPEC §3, "The official code differs").

Plain torch, float64, on a deep copy of the model with its own forward hooks:

* statistics: Linear as the paper; Conv2d patches per group *pooled over groups*, dilation
  ignored, ``H = Σ_rows ā² / (N·L'·C_in/groups·kh·kw)``; BatchNorm2d / LayerNorm a 2-entry H
  ``[Σ_c u_c², C] / N²`` with ``u_c = Σ x / P²`` on the *un-normalised* input and
  ``S_c = (Σ g_c)² / N``;
* ``H ← 0.1γ·H + 0.01γ·minmax(Ĥ)`` from ones (min-max of the new estimate, before the EMA);
* ``F = kron(H, S)ᵀ + λ`` on every entry; ``F = 1`` exactly outside Linear/Conv2d/BN2d/LN;
* bias-corrected momentum, κθ coupled (AdaFisher) or decoupled (AdaFisherW).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only contend (10x slower on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LAM = 1e-3
GAMMA = 0.8


def minmax(x, eps=1e-6):
    return (x - x.min()) / (x.max() - x.min() + eps)


# ---------------------------------------------------------------------------------------------
# official statistics, written out
# ---------------------------------------------------------------------------------------------
def official_stats(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    if type(m) is nn.Linear:
        a = x.reshape(-1, x.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1)
        gr = g.reshape(-1, g.shape[-1])
        return (a**2).sum(0) / a.shape[0], (gr**2).sum(0) / gr.shape[0]
    if type(m) is nn.Conv2d:
        n = x.shape[0]
        patches = F.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride)  # no dilation
        _, d, Lp = patches.shape
        G = m.groups
        cols = d // G
        rows = patches.reshape(n, G, cols, Lp).permute(0, 1, 3, 2).reshape(n * G * Lp, cols)
        if m.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=DT)], 1)
        H = (rows**2).sum(0) / (n * Lp * cols)
        L = g.shape[2] * g.shape[3]
        S = (g**2).sum((0, 2, 3)) / (n * L)
        return H, S
    if type(m) is nn.BatchNorm2d:
        n, c, h, w = x.shape
        u = x.sum((0, 2, 3)) / (h * w) ** 2
        H = torch.stack([(u**2).sum(), torch.tensor(float(c), dtype=DT)]) / n**2
        S = g.sum((0, 2, 3)) ** 2 / n
        return H, S
    if type(m) is nn.LayerNorm:
        n, k = x.shape[:2]
        dims = [0] + list(range(2, x.dim()))
        P = math.prod(x.shape[d] for d in dims[1:])
        u = x.sum(dims) / P**2
        H = torch.stack([(u**2).sum(), torch.tensor(float(k), dtype=DT)]) / n**2
        S = g.reshape(-1, g.shape[-1]).sum(0) ** 2 / n
        return H, S
    raise TypeError(type(m))


def official_curvature(m: nn.Module, H, S):
    F2 = S[:, None] * H[None, :] + LAM  # kron(H, S)ᵀ + λ, (out, in[+1]) or (C, 2)
    if type(m) in (nn.BatchNorm2d, nn.LayerNorm):
        return {"weight": F2[:, 0].clone(), "bias": F2[:, 1].clone()}
    out = {}
    n_w = m.weight[0].numel()
    out["weight"] = F2[:, :n_w].reshape(m.weight.shape)
    if m.bias is not None:
        out["bias"] = F2[:, n_w]
    return out


SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


class ReferenceOfficial:
    def __init__(self, model, *, lr, beta=0.9, wd=0.0, decoupled=False, interval=100, gamma=GAMMA):
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if type(m) in SUPPORTED}
        self.calls = {}
        for n, mod in self.layers.items():
            mod.register_forward_hook(self._hook(n))
        self.params = list(model.parameters())
        self.m = [torch.zeros_like(p) for p in self.params]
        self.lr, self.beta, self.wd, self.decoupled, self.interval = (
            lr,
            beta,
            wd,
            decoupled,
            interval,
        )
        self.H, self.S = {}, {}
        self.gamma = gamma
        self.steps = 0
        self.t = 0
        self.F = {}

    def _hook(self, name):
        def hook(mod, inputs, output):
            self.calls[name] = (inputs[0], output)

        return hook

    def step(self, loss_fn, batch):
        self.calls.clear()
        loss = loss_fn(self.model, batch)
        names = list(self.layers)
        outs = [self.calls[n][1] for n in names]
        grads = torch.autograd.grad(loss, outs + self.params)
        gouts, pgrads = grads[: len(names)], grads[len(names) :]
        if self.steps % self.interval == 0:
            for n, go in zip(names, gouts, strict=True):
                Hh, Sh = official_stats(self.layers[n], self.calls[n][0].detach(), go)
                H0 = self.H.get(n, torch.ones_like(Hh))
                S0 = self.S.get(n, torch.ones_like(Sh))
                self.H[n] = 0.1 * self.gamma * H0 + 0.01 * self.gamma * minmax(Hh)
                self.S[n] = 0.1 * self.gamma * S0 + 0.01 * self.gamma * minmax(Sh)
        Fs = {}
        for n, mod in self.layers.items():
            for role, val in official_curvature(mod, self.H[n], self.S[n]).items():
                Fs[id(getattr(mod, role))] = val
        self.F = Fs
        self.t += 1
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = pgrads[i] + (self.wd * p if self.wd and not self.decoupled else 0.0)
                self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g
                mhat = self.m[i] / (1 - self.beta**self.t)
                d = mhat / Fs.get(id(p), torch.ones_like(p))  # F = 1 exactly for the rest
                if self.wd and self.decoupled:
                    d = d + self.wd * p
                p.sub_(self.lr * d)
        self.steps += 1


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class ImageNet(nn.Module):
    """Conv2d (stride 2, padding 1, dilation 2, groups 2) → ReLU → BN2d → GroupNorm (unsupported:
    F = 1) → Linear → LayerNorm on 2-D input → ReLU → Linear; and a plain bias-free conv branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
        self.conv2 = nn.Conv2d(4, 2, 2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6 * 9 + 2 * 36, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        with torch.no_grad():
            for m in (self.bn, self.gn, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        a = self.gn(self.bn(torch.relu(self.conv(x)))).flatten(1)
        b = torch.tanh(self.conv2(x)).flatten(1)
        return self.out(torch.relu(self.ln(self.fc(torch.cat([a, b], 1)))))


class SeqNet(nn.Module):
    """Embedding (unsupported: F = 1) → LayerNorm on (N, T, D) → Linear on 3-D input → mean over
    T → BatchNorm1d (unsupported in the official code) → Linear without bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, tok):
        h = torch.relu(self.fc(self.ln(self.emb(tok)))).mean(1)
        return self.out(self.bn1(h))


def make_batches(kind, n_steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        if kind == "image":
            x = torch.randn(5, 4, 7, 7, generator=gen, dtype=DT) + 0.3
        else:
            x = torch.randint(0, 9, (5, 4), generator=gen)
        out.append((x, torch.randint(0, 3, (5,), generator=gen)))
    return out


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def new_model(kind):
    return (ImageNet() if kind == "image" else SeqNet()).double()


def run_pair(
    kind, batches, opt_cls=curvlab.AdaFisher, lr=1e-4, wd=0.0, interval=1, record=None, gamma=None
):
    model = new_model(kind)
    init = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceOfficial(
        copy.deepcopy(model),
        lr=lr,
        wd=wd,
        decoupled=opt_cls is curvlab.AdaFisherW,
        interval=100 if interval is None else interval,
        gamma=GAMMA if gamma is None else gamma,
    )
    extra = {} if interval is None else {"curvature_interval": interval}
    if gamma is not None:
        extra["gamma"] = gamma
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        opt = opt_cls(model, lr=lr, weight_decay=wd, variant="official", **extra)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        ref.step(loss_fn, batch)
        if record is not None:
            record.append([opt.preconditioner(p) for p in model.parameters()])
    return model, ref, opt, init


def assert_params_match(model, ref, init, rtol=1e-6):
    for (name, p), r, p0 in zip(
        model.named_parameters(), ref.model.parameters(), init, strict=True
    ):
        moved = (r - p0).abs().max().item()
        assert moved > 1e-9, f"{name} did not move"
        err = (p.detach() - r.detach()).abs().max().item()
        assert err <= rtol * moved, f"{name}: |curvlab − ref| = {err:.3e}, update {moved:.3e}"
        torch.testing.assert_close(p.detach(), r.detach(), rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "seq"])
@pytest.mark.parametrize(
    "opt_cls,wd",
    [(curvlab.AdaFisher, 0.0), (curvlab.AdaFisher, 0.1), (curvlab.AdaFisherW, 0.1)],
    ids=["AdaFisher", "AdaFisher-wd", "AdaFisherW-wd"],
)
def test_three_steps_match_reference(kind, opt_cls, wd):
    batches = make_batches(kind, 3)
    model, ref, opt, init = run_pair(kind, batches, opt_cls=opt_cls, wd=wd)
    assert_params_match(model, ref, init)
    by_id = dict(zip(map(id, model.parameters()), ref.model.parameters(), strict=True))
    for name, p in model.named_parameters():
        r = by_id[id(p)]
        want = ref.F.get(id(r))
        if want is None:  # unsupported layer: F = 1 exactly, no λ
            assert torch.equal(opt.preconditioner(p), torch.ones_like(p)), name
        else:
            torch.testing.assert_close(opt.preconditioner(p), want, rtol=1e-10, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["image", "seq"])
def test_ema_coefficients_scale_with_gamma(kind):
    """0.1γ and 0.01γ, not hard-coded 0.08 / 0.008: γ = 0.5 gives 0.05 / 0.005."""
    model, ref, opt, init = run_pair(kind, make_batches(kind, 3, seed=4), gamma=0.5)
    assert_params_match(model, ref, init)


def test_fallback_parameters_are_the_unsupported_layers():
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        opt = curvlab.AdaFisher(new_model("seq"), variant="official")
    names = sorted(fp.name.split(".")[0] for fp in opt.fallback_parameters())
    assert names == ["bn1", "bn1", "emb"]  # BatchNorm1d (exact class name match) and Embedding


def test_default_interval_is_100_factors_frozen_between():
    """Curvature on global steps 0 and 100 only (TCov = 100, one global counter)."""
    batches = make_batches("image", 101, seed=7)
    Fs = []
    model, ref, opt, init = run_pair("image", batches, lr=2e-5, interval=None, record=Fs)
    assert opt.curvature_interval == 100
    for k in range(1, 100):
        for a, b in zip(Fs[k], Fs[0], strict=True):
            assert torch.equal(a, b), f"F changed on step {k}"
    changed = [
        not torch.allclose(a, b, rtol=1e-8, atol=0) for a, b in zip(Fs[100], Fs[99], strict=True)
    ]
    n_supported = sum(1 for n, _ in model.named_parameters() if not n.startswith("gn."))
    assert sum(changed) == n_supported  # every supported parameter's F moves at step 100
    # and the values follow H₂ = 0.08·H₁ + 0.008·minmax(Ĥ₁₀₀) (the reference, also TCov = 100)
    assert_params_match(model, ref, init)
    by_id = dict(zip(map(id, model.parameters()), ref.model.parameters(), strict=True))
    for p in model.parameters():
        want = ref.F.get(id(by_id[id(p)]))
        if want is not None:
            torch.testing.assert_close(opt.preconditioner(p), want, rtol=1e-10, atol=0)


def test_default_interval_matches_reference_with_tcov_100():
    batches = make_batches("seq", 101, seed=8)
    model = new_model("seq")
    init = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceOfficial(copy.deepcopy(model), lr=2e-5, interval=100)
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        opt = curvlab.AdaFisher(model, lr=2e-5, variant="official")
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        ref.step(loss_fn, batch)
    assert_params_match(model, ref, init)


def _bounds(k: int) -> tuple[float, float]:
    """F/λ range after k ≥ 1 official updates, from H_k = 0.08^k + 0.008·Σ_j 0.08^(k−j)·mm_j
    with every minmax'd entry mm ∈ [0, 1): H_k ∈ [0.08^k, 0.08^k + 0.008(1 − 0.08^k)/0.92);
    the same for S, and F = H·S + λ."""
    lo = 0.08**k
    hi = 0.08**k + 0.008 * (1 - 0.08**k) / 0.92
    return 1 + lo * lo / LAM, 1 + hi * hi / LAM


def test_preconditioner_range_follows_from_the_ema():
    k_max = 12
    Fs = []
    batches = make_batches("image", k_max, seed=9)
    model, _, opt, _ = run_pair("image", batches, lr=1e-4, interval=1, record=Fs)
    supported = [i for i, (n, _) in enumerate(model.named_parameters()) if not n.startswith("gn.")]
    measured = []
    for k in range(1, k_max + 1):
        lo, hi = _bounds(k)
        ratios = torch.cat([(Fs[k - 1][i] / LAM).reshape(-1) for i in supported])
        measured.append((ratios.min().item(), ratios.max().item()))
        assert ratios.min().item() >= lo * (1 - 1e-12)
        assert ratios.max().item() <= hi * (1 + 1e-12)
    # the first update: H₁ = 0.08 + 0.008·minmax ⇒ F/λ ∈ [7.4, 8.744] — not "about λ"
    assert 7.4 <= measured[0][0] and measured[0][1] <= 8.75
    # from the third update on: F/λ ∈ [1, 1.085]; asymptotically ≤ 1 + (0.008/0.92)²/λ ≈ 1.0756
    assert _bounds(3)[1] < 1.085
    asymptote = 1 + (0.008 / 0.92) ** 2 / LAM
    assert abs(asymptote - 1.07561) < 1e-5
    for lo_k, hi_k in measured[2:]:
        assert 1.0 <= lo_k and hi_k < 1.085
    # some entry sits near the top of the range (an always-max entry: the norm layers' 2-entry H,
    # or a factor whose argmax is stable) and some at the bottom (H' = 0 or S' = 0 ⇒ F = λ + tiny)
    lo_last, hi_last = measured[-1]
    assert hi_last > 1.03
    assert lo_last < 1.0 + 1e-6
    # unsupported layer (GroupNorm): F = 1 exactly throughout
    gn = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("gn.")]
    for k in range(k_max):
        for i in gn:
            assert torch.equal(Fs[k][i], torch.ones_like(Fs[k][i]))


def test_default_first_hundred_steps_use_first_update_range():
    """With TCov = 100, steps 0..99 all use F from the *first* update: F/λ ∈ [7.4, 8.744]."""
    model = new_model("seq")
    with pytest.warns(curvlab.CurvatureFallbackWarning):
        opt = curvlab.AdaFisher(model, variant="official")
    batch = make_batches("seq", 1)[0]
    loss_fn(model, batch).backward()
    opt.step()
    lo, hi = _bounds(1)
    for name, p in model.named_parameters():
        if name.startswith(("emb", "bn1")):
            continue
        r = opt.preconditioner(p) / LAM
        assert lo * (1 - 1e-12) <= r.min().item() and r.max().item() <= hi * (1 + 1e-12), name


def test_official_norm_statistics_two_entry_layout():
    """BN2d: F[c, 0] serves the weight, F[c, 1] the bias; with Σu² < C the 2-vector minmax is
    [0, ~1], so after one update the weight gets S₁·0.08 + λ and the bias
    S₁·(0.08 + 0.008·~1) + λ."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(3).double()
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn, nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    ref_model = copy.deepcopy(model)
    opt = curvlab.AdaFisher(model, variant="official", curvature_interval=1)
    x = torch.randn(4, 2, 2, 2, dtype=DT)
    y = torch.tensor([0, 1, 1, 0])
    F.cross_entropy(model(x), y).backward()
    opt.step()

    seen = {}
    ref_model[1].register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    loss = F.cross_entropy(ref_model(x), y)
    (gout,) = torch.autograd.grad(loss, seen["out"])
    xin = seen["x"].detach()
    u = xin.sum((0, 2, 3)) / 4**2
    Hh = torch.stack([(u**2).sum(), torch.tensor(3.0, dtype=DT)]) / 16
    assert Hh[0] < Hh[1]
    Sh = gout.sum((0, 2, 3)) ** 2 / 4
    H1 = 0.08 + 0.008 * minmax(Hh)
    S1 = 0.08 + 0.008 * minmax(Sh)
    torch.testing.assert_close(H1[0], torch.tensor(0.08, dtype=DT), rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.preconditioner(bn.weight), S1 * H1[0] + LAM, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.preconditioner(bn.bias), S1 * H1[1] + LAM, rtol=1e-12, atol=0)
