"""The fast paths of the diagonal AdaFisher pipeline (issue 7, item 2), end to end.

* The factors the optimizer *captures* for a ResNet-style block (strided and padded 3×3 convs,
  a 1×1 strided projection shortcut, BatchNorm, a residual sum, a head) equal a straightforward
  per-layer computation on a separate copy of the model: im2col of the whole batch with
  ``F.unfold``, x̂ by hand, output gradients from ``torch.autograd.grad`` (float64, 1e-10) — for
  one batch and for two micro-batches of different sizes accumulated before ``step()``.
  (The adapter-level window-sum identity itself is tested in tests/plugins/adapters/test_conv2d.py.)
* The preconditioner, formed without a Kronecker product, and the foreach update equal
  ``θ − α g / (kron(minmax S, minmax H) + λ)`` on the first step (float64, 1e-10).
* No host–device synchronisation inside the hooks or ``step()``: Python-level reads of tensor
  values (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``index``) raise, and the profiler
  sees none of the ops that synchronise on CUDA (``aten::item``, ``aten::nonzero``,
  ``aten::bincount``, ...). On a CUDA machine, ``torch.cuda.set_sync_debug_mode("error")`` is
  checked as well.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.experiments.models import gpt
from curvlab.interfaces import update as update_interface

DT = torch.float64
LAM = 1e-3
EPS = 1e-6  # min-max ε


class Block(nn.Module):
    """Stem conv (with bias) + a ResNet basic block with a projection shortcut + a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.short = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = torch.relu(y + self.short(x))
        return self.fc(y.mean((2, 3)))


# -- the straightforward formulas ------------------------------------------------------------------
def straightforward_rows(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """(ā rows, g rows) of one call: ā² and g² averaged over these rows are H and S."""
    if isinstance(m, nn.Conv2d):
        patches = F.unfold(
            x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
        )
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·L, C·kh·kw)
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1)
        return a, g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    if isinstance(m, nn.BatchNorm2d):
        mu = x.mean((0, 2, 3), keepdim=True)
        var = ((x - mu) ** 2).mean((0, 2, 3), keepdim=True)
        xh = (x - mu) / torch.sqrt(var + m.eps)
        return xh.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), g.permute(0, 2, 3, 1).reshape(
            -1, g.shape[1]
        )
    if isinstance(m, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1)
        return a, g.reshape(-1, g.shape[-1])
    raise TypeError(type(m))


def reference_factors(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean of ā² and g² over the rows of every call in every micro-batch, per layer."""
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    }
    rows: dict[str, list] = {n: [] for n in layers}
    for x, y in batches:
        seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        handles = [
            m.register_forward_hook(
                lambda mod, inp, out, n=n, seen=seen: seen.append((n, inp[0], out))
            )
            for n, m in layers.items()
        ]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [out for _, _, out in seen])
        for (n, inp, _), g in zip(seen, grads):
            rows[n].append(straightforward_rows(layers[n], inp.detach(), g))
    out = {}
    for n, pairs in rows.items():
        a = torch.cat([p[0] for p in pairs])
        g = torch.cat([p[1] for p in pairs])
        out[n] = ((a * a).mean(0), (g * g).mean(0))
    return out


def make_batches(sizes: tuple[int, ...]):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(n, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 5, (n,), generator=g))
        for n in sizes
    ]


@pytest.mark.parametrize("sizes", [(6,), (4, 3)], ids=["one_batch", "two_micro_batches"])
def test_captured_factors_equal_straightforward_per_layer_formula(sizes):
    torch.manual_seed(0)
    model = Block().double()
    reference_model = copy.deepcopy(model)  # never hooked by curvlab
    opt = curvlab.AdaFisher(model, lr=0.0, gamma=0.0)  # γ = 0: the EMA state is this step's Ĥ, Ŝ
    batches = make_batches(sizes)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    opt.step()
    expected = reference_factors(reference_model, batches)
    assert set(opt.curvature_state) == set(expected)
    for name, (H, S) in expected.items():
        state = opt.curvature_state[name]
        assert state["H"].dtype == DT
        torch.testing.assert_close(
            state["H"].reshape(-1), H, rtol=1e-10, atol=1e-18, msg=f"{name} H"
        )
        torch.testing.assert_close(
            state["S"].reshape(-1), S, rtol=1e-10, atol=1e-18, msg=f"{name} S"
        )


def test_kronecker_free_preconditioner_and_update_equal_kron_formula():
    torch.manual_seed(0)
    model = Block().double()
    reference_model = copy.deepcopy(model)
    lr = 1e-2
    opt = curvlab.AdaFisher(model, lr=lr, gamma=0.0, damping=LAM)
    ((x, y),) = make_batches((6,))
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    factors = reference_factors(reference_model, [(x, y)])

    def minmax(v):
        return (v - v.min()) / (v.max() - v.min() + EPS)

    modules = dict(model.named_modules())
    for name, (H, S) in factors.items():
        m = modules[name]
        if isinstance(m, nn.BatchNorm2d):
            expected = {"weight": minmax(S) * minmax(H) + LAM, "bias": minmax(S) + LAM}
        else:
            F_full = torch.kron(minmax(S), minmax(H)).reshape(S.numel(), H.numel()) + LAM
            n_w = m.weight[0].numel()
            expected = {"weight": F_full[:, :n_w].reshape(m.weight.shape)}
            if m.bias is not None:
                expected["bias"] = F_full[:, n_w]
        for role, F_ref in expected.items():
            p = getattr(m, role)
            torch.testing.assert_close(opt.preconditioner(p), F_ref, rtol=1e-10, atol=0)
            key = f"{name}.{role}"
            # first step: m̂ = g, so θ₁ = θ₀ − α g / F
            torch.testing.assert_close(
                p.detach(), before[key] - lr * grads[key] / F_ref, rtol=1e-10, atol=1e-15, msg=key
            )


# -- no host-device synchronisation --------------------------------------------------
#: ops that wait for the device on CUDA (a value or an output size must reach the host)
SYNCING_OPS = {
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::bincount",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::masked_select",
    "aten::equal",
    "aten::is_nonzero",
    "aten::repeat_interleave",
    "aten::allclose",
    "aten::histc",
}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    """Python-level reads of tensor values raise; yields the profiler that saw the ops."""

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name}() inside the hooks or step()")

        return read

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with monkeypatch.context() as mp:
            # the device path: on CPU the rules may read the finite flag (free there)
            mp.setattr(update_interface, "READ_CPU_FLAGS", False)
            for name in READS:
                mp.setattr(torch.Tensor, name, forbidden(name))
            yield prof


def _aten_root(event):
    """The outermost ATen op that (transitively) called ``event``."""
    root = event
    while root.cpu_parent is not None and root.cpu_parent.name.startswith("aten::"):
        root = root.cpu_parent
    return root


def assert_no_syncing_ops(prof) -> None:
    """No op from SYNCING_OPS, whether called directly or inside another op (``x[mask]`` runs
    ``aten::nonzero``). Exception: ``aten::item`` inside a ``_foreach_*`` op with a 0-d tensor
    scalar (``torch._foreach_add_(steps, ok)``) is the CPU fallback of that op; on CUDA it is one
    fused kernel that reads the scalar on the device."""
    offenders = set()
    for event in prof.events():
        if event.name not in SYNCING_OPS:
            continue
        root = _aten_root(event)
        if event.name in ("aten::item", "aten::_local_scalar_dense") and root.name.startswith(
            "aten::_foreach_"
        ):
            continue
        offenders.add(event.name if root is event else f"{event.name} inside {root.name}")
    assert not offenders, (
        f"ops that synchronise on CUDA ran in the hooks or step(): {sorted(offenders)}"
    )


class TinyTransformer(nn.Module):
    """LayerNorm + attention-style Linear layers + GELU MLP on float inputs (no Embedding)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 5, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.mlp(x)).mean(1)


MODELS = {
    "block": Block,
    "transformer": TinyTransformer,
    # Embedding (token counts), LayerNorm, Linear, a head tied to the embedding
    "gpt": lambda: gpt(vocab_size=5, context=8, d_model=8, n_layers=1, n_heads=2),
}


def _data(kind: str):
    g = torch.Generator().manual_seed(5)
    if kind == "gpt":
        idx = torch.randint(0, 5, (2, 9), generator=g)
        return idx[:, :-1], idx[:, 1:]
    if kind == "block":
        return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    return torch.randn(3, 6, 8, generator=g), torch.randint(0, 5, (3,), generator=g)


OPTIMIZERS = {
    "adafisher": lambda m: curvlab.AdaFisher(m, lr=1e-3),
    "adafisher_k2": lambda m: curvlab.AdaFisher(m, lr=1e-3, curvature_interval=2),
    "adafisherw": lambda m: curvlab.AdaFisherW(m, lr=1e-3, weight_decay=1e-2),
    "official_k1": lambda m: curvlab.AdaFisher(
        m, lr=1e-3, variant="official", curvature_interval=1
    ),
}


def _train_guarded(which: str, kind: str, monkeypatch, guard_hooks: bool, guard_step: bool):
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = OPTIMIZERS[which](model)
    x, y = _data(kind)
    no_guard = contextlib.nullcontext
    for _ in range(3):  # the first step initialises the state; interval 2 skips a capture
        opt.zero_grad()
        with forbid_host_reads(monkeypatch) if guard_hooks else no_guard() as prof:
            logits = model(x)  # forward hooks
        loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))  # the user's code
        with forbid_host_reads(monkeypatch) if guard_hooks else no_guard() as prof_b:
            loss.backward()  # output-tensor hooks
        with forbid_host_reads(monkeypatch) if guard_step else no_guard() as prof_s:
            opt.step()
        for p in (prof, prof_b, prof_s):
            if p is not None:
                assert_no_syncing_ops(p)
    assert opt.metrics()["skipped_steps"] == 0
    assert len(opt.curvature_state) == len(opt.layers)


@pytest.mark.filterwarnings("ignore::curvlab.CurvatureFallbackWarning")
@pytest.mark.parametrize("kind", ["block", "transformer", "gpt"])
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_no_host_sync_in_hooks_and_step(which, kind, monkeypatch):
    _train_guarded(which, kind, monkeypatch, guard_hooks=True, guard_step=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_no_sync_cuda_debug_mode(which):
    torch.manual_seed(0)
    model = Block().cuda()
    opt = OPTIMIZERS[which](model)
    x, y = (t.cuda() for t in _data("block"))
    for _ in range(3):
        opt.zero_grad()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -- the CPU flag path and the device path -------------------------------------------------
def _train_with_nan(opt_factory, read_cpu_flags: bool, monkeypatch) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = Block().double()
    opt = opt_factory(model)
    x, y = _data("block")
    x = x.double()
    monkeypatch.setattr(update_interface, "READ_CPU_FLAGS", read_cpu_flags)
    for step in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == 2:  # a non-finite gradient: this step must be skipped
            next(model.parameters()).grad[0] = float("nan")
        opt.step()
    assert opt.metrics()["skipped_steps"] == 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}
    return state, moments


@pytest.mark.parametrize(
    "factory",
    [
        lambda m: curvlab.AdaFisher(m, lr=1e-2),
        lambda m: curvlab.AdaFisher(m, lr=1e-2, weight_decay=1e-2),  # coupled
        lambda m: curvlab.AdaFisherW(m, lr=1e-2, weight_decay=1e-1),  # decoupled
        lambda m: curvlab.build_optimizer(m, "configs/ablations/sqrt.gin"),
    ],
    ids=["adafisher", "coupled_wd", "adafisherw", "sqrt"],
)
def test_cpu_flag_path_equals_device_path(factory, monkeypatch):
    """Reading the finite flag on CPU (no masking pass) and blending with it on device give
    the same parameters and state, a skipped step included (float64; the two paths round
    the coupled decay term differently, and min-max on BatchNorm magnifies rounding)."""
    params_cpu, state_cpu = _train_with_nan(factory, True, monkeypatch)
    params_dev, state_dev = _train_with_nan(factory, False, monkeypatch)
    for key, value in params_cpu.items():
        torch.testing.assert_close(params_dev[key], value, rtol=1e-12, atol=1e-14)
    for i, s in state_cpu.items():
        for key, value in s.items():
            torch.testing.assert_close(state_dev[i][key], value, rtol=1e-12, atol=1e-14)


# -- layers reading the same input share its statistic --------------------------------------
class SharedInput(nn.Module):
    """q/k/v-style projections of one tensor; ``clone_k`` feeds k a copy instead."""

    def __init__(self, clone_k: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4, bias=False)
        self.clone_k = clone_k

    def forward(self, x):
        x = x * 1.0  # a tensor the hooks see as the same object three times
        q = self.q(x)
        k = self.k(x.clone() if self.clone_k else x)
        return (q * k).sum(-1) + self.v(x).sum(-1)


def test_shared_input_statistic_equals_separate_computation():
    """q and k (same signature) share one input statistic; v (no bias: another signature)
    computes its own. Factors equal the ones computed from separate copies of the input."""
    x = torch.randn(5, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    states, calls = [], []
    for clone_k in (False, True):
        torch.manual_seed(0)
        model = SharedInput(clone_k=clone_k).double()
        opt = curvlab.AdaFisher(model)
        counter = {"n": 0}
        original = opt.estimator.input_statistic

        def counting(*args, _original=original, _counter=counter):
            _counter["n"] += 1
            return _original(*args)

        opt.estimator.input_statistic = counting
        for _ in range(2):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        states.append(
            {n: {k: v.clone() for k, v in s.items()} for n, s in opt.curvature_state.items()}
        )
        calls.append(counter["n"])
    shared, separate = states
    for name in separate:
        for key in ("H", "S"):
            torch.testing.assert_close(shared[name][key], separate[name][key], rtol=0, atol=0)
    assert calls[1] == 2 * 3  # separate copies: q, k, v each step
    assert calls[0] == 2 * 2  # shared: k reuses q's statistic


# -- BatchNorm: the batch statistics saved by the forward pass ------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(8, 5, 6, 6), (16, 5)])
def test_batchnorm_saved_statistics_equal_recomputation(shape, dtype, tol, monkeypatch):
    """H of a training-mode BatchNorm from the saved 1/√(σ²+ε) (no pass over x) equals the
    recomputation from x and the straightforward mean of x̂²; the saved path is really taken."""
    from curvlab.plugins.adapters import normalization

    g = torch.Generator().manual_seed(3)
    bn = (nn.BatchNorm2d(5) if len(shape) == 4 else nn.BatchNorm1d(5)).to(dtype)
    x = (torch.randn(*shape, generator=g, dtype=dtype) * 3 + 1).requires_grad_()
    out = bn(x)
    adapter = normalization.BatchNormAdapter()
    assert normalization.saved_batch_invstd(bn, out) is not None
    with torch.no_grad():
        saved = adapter.input_diagonal(bn, x, out, dtype)
        monkeypatch.setattr(normalization, "READ_SAVED_BATCH_STATS", False)
        recomputed = adapter.input_diagonal(bn, x, out, dtype)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    x_hat = F.batch_norm(x.detach(), None, None, training=True, eps=bn.eps)
    reference = (x_hat**2).sum(dims)
    assert saved.count == recomputed.count == x.numel() // 5
    torch.testing.assert_close(saved.total, reference, rtol=tol, atol=tol)
    torch.testing.assert_close(recomputed.total, reference, rtol=tol, atol=tol)


def test_batchnorm_without_saved_statistics_recomputes():
    """Eval mode, or an output without the native autograd node: None, so H is recomputed."""
    from curvlab.plugins.adapters import normalization

    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    assert normalization.saved_batch_invstd(bn, bn(x).detach()) is None
    assert normalization.saved_batch_invstd(bn, bn(x) * 1.0) is None
    bn.eval()
    assert normalization.saved_batch_invstd(bn, bn(x)) is None  # running statistics


# -- the packed diagonal factors ------------------------------------------------------------
class MixedPrecisionPair(nn.Module):
    """A float64 layer feeding a float32 layer: two packs (one per dtype) in the store."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4).double()
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).float())


def test_packed_factors_per_dtype_equal_hand_statistics():
    """H and S of a float64 and a float32 layer (two packs) after one step are (1−γ) times
    the hand-computed means; the state entries are views into the packs and keep their dtype."""
    torch.manual_seed(0)
    model = MixedPrecisionPair()
    opt = curvlab.AdaFisher(model, gamma=0.8)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)  # full backward hooks
    outputs = {}
    hooks = [
        m.register_full_backward_hook(lambda m, gi, go, k=k: outputs.__setitem__(k, go[0]))
        for k, m in (("a", model.a), ("b", model.b))
    ]
    model(x).square().sum().backward()
    inputs = {"a": x.detach(), "b": torch.tanh(model.a(x)).float().detach()}
    opt.step()
    for h in hooks:
        h.remove()
    for name, layer in (("a", model.a), ("b", model.b)):
        state = opt.curvature_state[name]
        dtype = layer.weight.dtype
        assert state["H"].dtype == state["S"].dtype == dtype
        rows = inputs[name].shape[0]
        H_hand = torch.cat([(inputs[name] ** 2).mean(0), torch.ones(1, dtype=dtype)])
        S_hand = (outputs[name] ** 2).sum(0) / rows
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(state["H"], 0.2 * H_hand, rtol=tol, atol=tol)
        torch.testing.assert_close(state["S"], 0.2 * S_hand.to(dtype), rtol=tol, atol=tol)
        assert bool(state["updated"])
    assert {opt.curvature_state[n]["H"].untyped_storage().data_ptr() for n in "ab"} == {
        opt._diagonal._packs[(torch.device("cpu"), dt)].ema.untyped_storage().data_ptr()
        for dt in (torch.float64, torch.float32)
    }


class LateBranch(nn.Module):
    """``a(x)`` always, ``b(x)`` added only once ``use_b`` is set (loss = sum: a's statistics
    do not depend on b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.use_b = False

    def forward(self, x):
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def test_late_layer_repacks_without_disturbing_the_others():
    """A layer whose first statistics arrive at step 2 re-packs the store: the other layer's
    factors and parameters stay bitwise those of a run without the late layer."""
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    runs = []
    for late in (True, False):
        torch.manual_seed(0)
        model = LateBranch().double()
        opt = curvlab.AdaFisher(model, lr=1e-2, warn_on_fallback=False)
        for step in range(4):
            model.use_b = late and step >= 2
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        runs.append((model, opt))
    (late_model, late_opt), (plain_model, plain_opt) = runs
    assert set(late_opt.curvature_state) == {"a", "b"} and set(plain_opt.curvature_state) == {"a"}
    for key in ("H", "S"):
        assert torch.equal(late_opt.curvature_state["a"][key], plain_opt.curvature_state["a"][key])
    assert torch.equal(late_model.a.weight, plain_model.a.weight)
    # b: two accepted updates from zero, H = (1 − γ²) mean x² (bias entry 1)
    H_b = torch.cat([(x**2).mean(0), torch.ones(1, dtype=x.dtype)]) * (1 - 0.8**2)
    torch.testing.assert_close(late_opt.curvature_state["b"]["H"], H_b, rtol=1e-12, atol=1e-15)
