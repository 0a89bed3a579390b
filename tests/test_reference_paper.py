"""Independent reference for the *paper* variant of AdaFisher (SPEC §3), in plain torch.

The reference never calls curvlab: it runs a deep copy of the model (taken before the optimizer
hooks anything), records each layer's input / output with its own forward hooks, takes the output
gradients with ``torch.autograd.grad`` and builds the factors with the straightforward formulas
(conv: ``F.unfold`` patches of the batch; norm layers: x̂ recomputed by hand from mean/var), then
applies Algorithm 1 of the thesis:

    H ← γH + (1−γ)Ĥ, S ← γS + (1−γ)Ŝ   (from zero, only on curvature steps)
    F = minmax(S) ⊗ minmax(H) + λ       (minmax over the whole factor incl. bias entry, eps 1e-6)
    m ← βm + (1−β)g,  m̂ = m/(1−β^t),  θ ← θ − α m̂/F      (AdaFisher: g += κθ; AdaFisherW: −ακθ)

Everything is float64; parameters must agree to 1e-6 relative.
"""

from __future__ import annotations

import copy
import warnings

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


EPS_MINMAX = 1e-6


# ---------------------------------------------------------------------------------------------
# plain-torch reference
# ---------------------------------------------------------------------------------------------
def minmax(x: torch.Tensor, eps: float = EPS_MINMAX) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + eps)


def _append_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def linear_stats(m: nn.Linear, x, g):
    a = x.reshape(-1, x.shape[-1])
    if m.bias is not None:
        a = _append_ones(a)
    gr = g.reshape(-1, g.shape[-1])
    return (a**2).mean(0), (gr**2).mean(0)


def conv_stats(m: nn.Conv2d, x, g):
    """im2col of the whole batch with F.unfold, per group; rows = (sample, position)."""
    assert isinstance(m.padding, tuple) and m.padding_mode == "zeros"
    patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    n, d, L = patches.shape
    G = m.groups
    rows = patches.reshape(n, G, d // G, L).permute(1, 0, 3, 2).reshape(G, n * L, d // G)
    if m.bias is not None:
        rows = _append_ones(rows)
    H = (rows**2).mean(1)  # (G, d/G [+1])
    S = (g**2).sum((0, 2, 3)) / (g.shape[0] * g.shape[2] * g.shape[3])
    return H, S


def normalized_by_hand(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x̂ entering the affine transform and the dims of the normalisation set of each feature."""
    if isinstance(m, nn.BatchNorm2d):
        mu = x.mean((0, 2, 3), keepdim=True)
        var = ((x - mu) ** 2).mean((0, 2, 3), keepdim=True)
        return (x - mu) / torch.sqrt(var + m.eps), (0, 2, 3)
    if isinstance(m, nn.LayerNorm):
        k = len(m.normalized_shape)
        dims = tuple(range(x.dim() - k, x.dim()))
        mu = x.mean(dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dims, keepdim=True)
        return (x - mu) / torch.sqrt(var + m.eps), tuple(range(x.dim() - k))
    if isinstance(m, nn.GroupNorm):
        n, c = x.shape[:2]
        xg = x.reshape(n, m.num_groups, -1)
        mu = xg.mean(-1, keepdim=True)
        var = ((xg - mu) ** 2).mean(-1, keepdim=True)
        xh = ((xg - mu) / torch.sqrt(var + m.eps)).reshape(x.shape)
        return xh, (0,) + tuple(range(2, x.dim()))
    raise TypeError(type(m))


def norm_stats(m, x, g):
    xh, dims = normalized_by_hand(m, x)
    return (xh**2).mean(dims), (g**2).mean(dims)


def embedding_stats(m: nn.Embedding, idx, g):
    counts = torch.zeros(m.num_embeddings, dtype=DT)
    for v in idx.reshape(-1).tolist():
        counts[v] += 1
    gr = g.reshape(-1, g.shape[-1])
    return counts / idx.numel(), (gr**2).mean(0)


def layer_stats(m, x, g):
    if isinstance(m, nn.Linear):
        return linear_stats(m, x, g)
    if isinstance(m, nn.Conv2d):
        return conv_stats(m, x, g)
    if isinstance(m, nn.Embedding):
        return embedding_stats(m, x, g)
    return norm_stats(m, x, g)


def layer_curvature(m, Hn, Sn) -> dict[str, torch.Tensor]:
    """Un-damped F per role from normalised factors (written out per layer type)."""
    if isinstance(m, nn.Linear):
        out = {"weight": Sn[:, None] * Hn[None, : m.in_features]}
        if m.bias is not None:
            out["bias"] = Sn * Hn[-1]
        return out
    if isinstance(m, nn.Conv2d):
        cout = m.out_channels
        per_group = cout // m.groups
        Fw = torch.empty_like(m.weight)
        Fb = torch.empty(cout, dtype=DT)
        n_w = m.weight[0].numel()
        for o in range(cout):
            k = o // per_group
            Fw[o] = (Sn[o] * Hn[k, :n_w]).reshape(m.weight.shape[1:])
            if m.bias is not None:
                Fb[o] = Sn[o] * Hn[k, n_w]
        out = {"weight": Fw}
        if m.bias is not None:
            out["bias"] = Fb
        return out
    if isinstance(m, nn.Embedding):
        return {"weight": Hn[:, None] * Sn[None, :]}
    return {"weight": Hn * Sn, "bias": Sn.clone()}


class Recorder:
    """Own forward hooks: records (module, input, output) of the listed modules."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.calls: dict[str, tuple] = {}
        for name, mod in modules.items():
            mod.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(mod, inputs, output):
            assert name not in self.calls, "reference models use each layer once"
            self.calls[name] = (inputs[0], output)

        return hook


class ReferenceAdaFisher:
    """Algorithm 1 (paper variant) on a reference copy of the model."""

    def __init__(
        self,
        model: nn.Module,
        layer_names: list[str],
        *,
        lr=1e-3,
        beta=0.9,
        gamma=0.8,
        lam=1e-3,
        wd=0.0,
        decoupled=False,
        interval=1,
        mutation: str | None = None,
    ):
        self.model = model
        named = dict(model.named_modules())
        self.layers = {n: named[n] for n in layer_names}
        self.rec = Recorder(self.layers)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.lr, self.beta, self.gamma, self.lam = lr, beta, gamma, lam
        self.wd, self.decoupled, self.interval = wd, decoupled, interval
        self.H: dict[str, torch.Tensor] = {}
        self.S: dict[str, torch.Tensor] = {}
        self.k = 0  # step() calls so far
        self.t = 0
        self.mutation = mutation
        self.last_F: dict[int, torch.Tensor] = {}

    def _minmax(self, x, name):
        if self.mutation == "minmax_without_bias_entry":
            m = self.layers[name]
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None and x.dim() >= 1:
                core = x[..., :-1]
                lo, hi = core.min(), core.max()
                return (x - lo) / (hi - lo + EPS_MINMAX)
        return minmax(x)

    def step(self, loss_fn, batch, micro_batches=None):
        """One step; with ``micro_batches`` several forward/backward passes are accumulated:
        gradients summed, statistics averaged over *all rows* of all passes."""
        names = list(self.layers)
        p_grads = [torch.zeros_like(p) for p in self.params]
        H_sum: dict[str, torch.Tensor] = {}
        S_sum: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        for mb in micro_batches if micro_batches is not None else [batch]:
            self.rec.calls.clear()
            loss = loss_fn(self.model, mb)
            outputs = [self.rec.calls[n][1] for n in names]
            grads = torch.autograd.grad(loss, outputs + self.params)
            for i, g in enumerate(grads[len(names) :]):
                p_grads[i] = p_grads[i] + g
            for n, go in zip(names, grads[: len(names)], strict=True):
                Hh, Sh = layer_stats(self.layers[n], self.rec.calls[n][0].detach(), go.detach())
                r = go.numel() // Sh.numel()
                H_sum[n] = H_sum.get(n, 0.0) + Hh * r
                S_sum[n] = S_sum.get(n, 0.0) + Sh * r
                rows[n] = rows.get(n, 0) + r
        if self.k % self.interval == 0:
            g = 0.0 if self.mutation == "no_ema" else self.gamma
            for n in names:
                Hh, Sh = H_sum[n] / rows[n], S_sum[n] / rows[n]
                H0 = self.H.get(n, torch.zeros_like(Hh))
                S0 = self.S.get(n, torch.zeros_like(Sh))
                self.H[n] = g * H0 + (1 - g) * Hh
                self.S[n] = g * S0 + (1 - g) * Sh
        # preconditioner
        Fs: dict[int, torch.Tensor] = {}
        for n, mod in self.layers.items():
            Hn, Sn = self._minmax(self.H[n], n), self._minmax(self.S[n], n)
            for role, val in layer_curvature(mod, Hn, Sn).items():
                Fs[id(getattr(mod, role))] = val + self.lam
        self.last_F = Fs
        self.t += 1
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = p_grads[i]
                if self.wd and not self.decoupled:
                    g = g + self.wd * p
                self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g
                corr = 1.0 if self.mutation == "no_bias_correction" else 1 - self.beta**self.t
                mhat = self.m[i] / corr
                Fp = Fs.get(id(p), torch.full_like(p, 1.0 + self.lam))
                if self.mutation == "sqrt":
                    Fp = Fp.sqrt()
                d = mhat / Fp
                if self.wd and self.decoupled:
                    d = d + self.wd * p
                p.sub_(self.lr * d)
        self.k += 1


# ---------------------------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------------------------
def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_batches(n_steps, x_shape, n_classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(*x_shape, generator=gen, dtype=DT),
            torch.randint(0, n_classes, (x_shape[0],), generator=gen),
        )
        for _ in range(n_steps)
    ]


def run_both(
    model,
    layer_names,
    batches,
    *,
    opt_cls=curvlab.AdaFisher,
    loss_fn=ce_loss,
    curvlab_kwargs=None,
    ref_kwargs=None,
    mutation=None,
):
    model = model.double()
    init = [p.detach().clone() for p in model.parameters()]
    ref_model = copy.deepcopy(model)
    curvlab_kwargs = dict(curvlab_kwargs or {})
    ref = ReferenceAdaFisher(ref_model, layer_names, mutation=mutation, **(ref_kwargs or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvlab.CurvatureFallbackWarning)
        opt = opt_cls(model, **curvlab_kwargs)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        ref.step(loss_fn, batch)
    return model, ref, opt, init


def assert_params_match(model, ref_model, init, rtol=1e-6):
    for (name, p), r, p0 in zip(
        model.named_parameters(), ref_model.parameters(), init, strict=True
    ):
        moved = (r - p0).abs().max().item()
        assert moved > 1e-8, f"{name} did not move: the comparison would be vacuous"
        err = (p.detach() - r.detach()).abs().max().item()
        assert err <= rtol * moved, (
            f"{name}: |curvlab − ref| = {err:.3e} vs update size {moved:.3e}"
        )
        torch.testing.assert_close(p.detach(), r.detach(), rtol=rtol, atol=1e-12)


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


MLP_LAYERS = ["0", "2"]


def conv_net(case: str):
    if case == "plain":
        conv = nn.Conv2d(3, 4, 3, padding=1)
        side, cin = 5, 3
    else:  # stride 2, padding 1, dilation 2, groups 2
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
        side, cin = 7, 4
    with torch.no_grad():
        out = conv(torch.zeros(1, cin, side, side))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(out[0].numel(), 3))
    return model, (6, cin, side, side)


CONV_LAYERS = ["0", "3"]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
HP = dict(lr=2e-3, beta=0.9, gamma=0.8)


def test_mlp_five_steps_matches_reference():
    batches = make_batches(5, (16, 5), 3)
    model, ref, opt, init = run_both(
        mlp(),
        MLP_LAYERS,
        batches,
        curvlab_kwargs=dict(HP, damping=1e-3),
        ref_kwargs=dict(HP, lam=1e-3),
    )
    assert_params_match(model, ref.model, init)
    # and the preconditioner of the last step, entry by entry
    for p in model.parameters():
        r = dict(zip(map(id, model.parameters()), ref.model.parameters(), strict=True))[id(p)]
        torch.testing.assert_close(opt.preconditioner(p), ref.last_F[id(r)], rtol=1e-9, atol=0)


@pytest.mark.parametrize("case", ["plain", "strided_dilated_grouped"])
def test_conv_net_five_steps_matches_reference(case):
    net, x_shape = conv_net(case)
    batches = make_batches(5, x_shape, 3, seed=2)
    model, ref, opt, init = run_both(
        net,
        CONV_LAYERS,
        batches,
        curvlab_kwargs=dict(HP, damping=1e-3),
        ref_kwargs=dict(HP, lam=1e-3),
    )
    assert_params_match(model, ref.model, init)
    by_id = dict(zip(map(id, model.parameters()), ref.model.parameters(), strict=True))
    for p in model.parameters():
        torch.testing.assert_close(
            opt.preconditioner(p), ref.last_F[id(by_id[id(p)])], rtol=1e-9, atol=0
        )


@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaFisher", "AdaFisherW"])
def test_weight_decay_matches_reference(decoupled):
    wd = 0.05
    opt_cls = curvlab.AdaFisherW if decoupled else curvlab.AdaFisher
    net, x_shape = conv_net("strided_dilated_grouped")
    batches = make_batches(5, x_shape, 3, seed=3)
    model, ref, _, init = run_both(
        net,
        CONV_LAYERS,
        batches,
        opt_cls=opt_cls,
        curvlab_kwargs=dict(HP, weight_decay=wd),
        ref_kwargs=dict(HP, wd=wd, decoupled=decoupled),
    )
    assert_params_match(model, ref.model, init)
    # weight decay really changed the trajectory (the test is not vacuous)
    model0, ref0, _, _ = run_both(
        conv_net("strided_dilated_grouped")[0],
        CONV_LAYERS,
        batches,
        opt_cls=opt_cls,
        curvlab_kwargs=dict(HP),
        ref_kwargs=dict(HP),
    )
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(ref.model.parameters(), ref0.model.parameters(), strict=True)
    )
    assert diff > 1e-6


def test_curvature_interval_two_freezes_factors_between_updates():
    batches = make_batches(5, (16, 5), 3, seed=4)
    model = mlp().double()
    init = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceAdaFisher(copy.deepcopy(model), MLP_LAYERS, interval=2, **HP)
    opt = curvlab.AdaFisher(model, curvature_interval=2, **HP)
    Fs = []
    for batch in batches:
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()
        ref.step(ce_loss, batch)
        Fs.append([opt.preconditioner(p) for p in model.parameters()])
    assert_params_match(model, ref.model, init)
    for k in (1, 3):  # no capture on steps 1 and 3: F is the one of steps 0 and 2
        for a, b in zip(Fs[k], Fs[k - 1], strict=True):
            assert torch.equal(a, b)
    for k in (2, 4):  # updated on steps 2 and 4
        assert any(
            not torch.allclose(a, b, rtol=1e-6, atol=0)
            for a, b in zip(Fs[k], Fs[k - 1], strict=True)
        )
    # and the trajectory really differs from curvature on every step
    ref1 = ReferenceAdaFisher(mlp().double(), MLP_LAYERS, **HP)
    for q, q0 in zip(ref1.model.parameters(), init, strict=True):
        q.data.copy_(q0)
    for batch in batches:
        ref1.step(ce_loss, batch)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(ref1.model.parameters(), model.parameters(), strict=True)
    )
    assert diff > 1e-6


@pytest.mark.parametrize(
    "mutation", ["minmax_without_bias_entry", "no_ema", "sqrt", "no_bias_correction"]
)
def test_reference_is_discriminating(mutation):
    """A reference with one detail of SPEC §3 changed must *disagree* with curvlab beyond the
    1e-6 tolerance: the agreement tests above can fail."""
    net, x_shape = conv_net("strided_dilated_grouped")
    batches = make_batches(5, x_shape, 3, seed=2)
    model, ref, _, init = run_both(
        net, CONV_LAYERS, batches, curvlab_kwargs=HP, ref_kwargs=HP, mutation=mutation
    )
    with pytest.raises(AssertionError):
        assert_params_match(model, ref.model, init)


# ---------------------------------------------------------------------------------------------
# normalisation layers and embedding: F after one step vs Prop. 3.3.1
# ---------------------------------------------------------------------------------------------
class NormNet(nn.Module):
    """An image branch (Conv2d → BatchNorm2d → ReLU → GroupNorm) and a token branch
    (Embedding → LayerNorm on (N, T, D)), summed into the logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head_img = nn.Linear(4 * 4 * 4, 3)
        self.emb = nn.Embedding(7, 5)
        self.ln = nn.LayerNorm(5)
        self.head_tok = nn.Linear(5, 3)
        with (
            torch.no_grad()
        ):  # non-trivial affine parameters so that s differs from the input grads
            for m in (self.bn, self.gn, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, batch):
        img, tok = batch
        a = self.gn(torch.relu(self.bn(self.conv(img))))
        b = self.ln(self.emb(tok))  # (N, T, D)
        return self.head_img(a.flatten(1)) + self.head_tok(torch.tanh(b)).mean(1)


NORM_LAYERS = ["conv", "bn", "gn", "head_img", "emb", "ln", "head_tok"]


def norm_loss(model, batch):
    img, tok, y = batch
    return F.cross_entropy(model((img, tok)), y)


def test_norm_layers_and_embedding_preconditioner_after_one_step():
    gen = torch.Generator().manual_seed(5)
    n = 6
    img = torch.randn(n, 2, 4, 4, generator=gen, dtype=DT) * 2 + 0.5
    tok = torch.randint(0, 7, (n, 4), generator=gen)
    tok[0, 0] = 6  # make sure some tokens repeat and some never occur (H has zeros)
    tok[tok == 3] = 2
    y = torch.randint(0, 3, (n,), generator=gen)
    batch = (img, tok, y)

    model = NormNet().double()
    ref_model = copy.deepcopy(model)
    opt = curvlab.AdaFisher(model, **HP)
    opt.zero_grad()
    norm_loss(model, batch).backward()
    opt.step()

    # by hand: hooks, output gradients, Prop. 3.3.1; γ-EMA from zero (one update: (1−γ)·Ĥ)
    rec = Recorder({n_: getattr(ref_model, n_) for n_ in NORM_LAYERS})
    loss = norm_loss(ref_model, batch)
    outs = [rec.calls[n_][1] for n_ in NORM_LAYERS]
    gouts = torch.autograd.grad(loss, outs)
    lam, g = 1e-3, HP["gamma"]
    checked = 0
    for name, go in zip(NORM_LAYERS, gouts, strict=True):
        mod = getattr(ref_model, name)
        x = rec.calls[name][0].detach()
        Hh, Sh = layer_stats(mod, x, go)
        Hn, Sn = minmax((1 - g) * Hh), minmax((1 - g) * Sh)
        live = getattr(model, name)
        if name in ("bn", "gn", "ln"):
            want = {"weight": Hn * Sn + lam, "bias": Sn + lam}
            # H_c really is the mean of x̂² over the normalisation set (≈ 1 for BN, not for GN/LN)
            if name == "bn":
                torch.testing.assert_close(Hh, torch.full_like(Hh, 1.0), rtol=1e-4, atol=0)
        elif name == "emb":
            counts = torch.bincount(tok.reshape(-1), minlength=7).to(DT) / tok.numel()
            torch.testing.assert_close(Hh, counts)
            want = {"weight": Hn[:, None] * Sn[None, :] + lam}
            assert (Hn == 0).any()  # unseen tokens: F = λ on their rows
        else:
            want = {k: v + lam for k, v in layer_curvature(mod, Hn, Sn).items()}
        for role, w in want.items():
            torch.testing.assert_close(
                opt.preconditioner(getattr(live, role)), w, rtol=1e-9, atol=0
            )
            checked += 1
    assert checked == 13
    # the rest of the step also follows the formula: θ₁ = θ₀ − α·g/F (m̂ = g at t = 1)
    rec.calls.clear()
    grads = torch.autograd.grad(norm_loss(ref_model, batch), list(ref_model.parameters()))
    for (name, p), r, gr in zip(
        model.named_parameters(), ref_model.parameters(), grads, strict=True
    ):
        expected = r.detach() - HP["lr"] * gr / opt.preconditioner(p)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-13, msg=name)


def test_unsupported_parameter_gets_one_plus_lambda_and_matches_reference():
    """A PReLU weight (no adapter) falls back to F = 1 + λ (paper: identity factors)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(), nn.Linear(6, 3)).double()
    init = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceAdaFisher(copy.deepcopy(model), MLP_LAYERS, **HP)
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="PReLU"):
        opt = curvlab.AdaFisher(model, **HP)
    for batch in make_batches(5, (12, 5), 3, seed=6):
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()
        ref.step(ce_loss, batch)
    assert_params_match(model, ref.model, init)
    assert torch.equal(opt.preconditioner(model[1].weight), torch.full((1,), 1 + 1e-3, dtype=DT))


def test_gradient_accumulation_averages_over_all_rows():
    """Two backward passes of different sizes (8 and 3 rows) per step: the factors are the mean
    over all 11 rows (not the mean of the two means), the gradient is the sum."""
    model = mlp().double()
    init = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceAdaFisher(copy.deepcopy(model), MLP_LAYERS, **HP)
    opt = curvlab.AdaFisher(model, **HP)
    steps = [
        (make_batches(1, (8, 5), 3, seed=10 + k)[0], make_batches(1, (3, 5), 3, seed=20 + k)[0])
        for k in range(4)
    ]
    for micro in steps:
        opt.zero_grad()
        for mb in micro:
            ce_loss(model, mb).backward()
        opt.step()
        ref.step(ce_loss, None, micro_batches=list(micro))
    assert_params_match(model, ref.model, init)
    by_id = dict(zip(map(id, model.parameters()), ref.model.parameters(), strict=True))
    for p in model.parameters():
        torch.testing.assert_close(
            opt.preconditioner(p), ref.last_F[id(by_id[id(p)])], rtol=1e-9, atol=0
        )
