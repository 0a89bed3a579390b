"""nn.MultiheadAttention adapter (plugins/adapters/attention.py), float64.

* The factors of every block (q, k, v projections, packed or separate; out_proj; bias_k /
  bias_v) equal those of an equivalent attention built from verified ``nn.Linear`` layers
  holding the same weights (``attention_oracle.LinearAttention``), diagonal and full K-FAC, over
  self-/cross-attention, kdim/vdim, batch_first, bias, add_bias_kv, add_zero_attn and masks.
* Whole trajectories: AdaFisher / K-FAC / banded on the MHA equal the same optimizer on the
  oracle (per-block min-max, eigenbases and regions of the packed parameter included).
* The observed forward is the module's own forward: outputs, attention weights and the
  gradients of inputs and parameters agree to 1e-12 with dropout > 0 under the same seed.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.plugins.adapters.attention import (
    AttentionKVBias,
    AttentionProjection,
    MultiheadAttentionAdapter,
)
from tests.plugins.adapters.attention_oracle import LinearAttention

DT = torch.float64
E, HEADS, L, S, N = 8, 2, 5, 4, 3
KIND_DIMS = {"self": (E, E), "cross": (E, E), "kvdim": (6, 7)}


def make_mha(
    kind: str,
    batch_first: bool,
    bias: bool = True,
    bias_kv: bool = False,
    zero_attn: bool = False,
    dropout: float = 0.0,
) -> nn.MultiheadAttention:
    kdim, vdim = KIND_DIMS[kind]
    mha = nn.MultiheadAttention(
        E,
        HEADS,
        dropout=dropout,
        bias=bias,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
    ).double()
    with torch.no_grad():  # torch initialises biases to 0: make every entry matter
        for p in mha.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mha


def make_inputs(kind: str, batch_first: bool, unbatched: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kdim, vdim = KIND_DIMS[kind]
    src = L if kind == "self" else S

    def t(length: int, dim: int) -> Tensor:
        if unbatched:
            return torch.randn(length, dim, generator=g, dtype=DT)
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(*shape, generator=g, dtype=DT)

    query = t(L, E)
    if kind == "self":
        return query, query, query
    key = t(src, kdim)
    return query, key, key if kind == "cross" else t(src, vdim)


def make_masks(mask: str, kind: str, unbatched: bool = False, seed: int = 1) -> dict:
    """Keyword arguments: masks with at least one visible key per row."""
    g = torch.Generator().manual_seed(seed)
    src = L if kind == "self" else S
    out: dict = {}
    if mask in ("kpm", "both", "kpm_float"):
        kpm = torch.rand(N, src, generator=g) < 0.4
        kpm[:, 0] = False
        kpm = kpm[0] if unbatched else kpm
        out["key_padding_mask"] = kpm if mask != "kpm_float" else kpm.to(DT) * -1e4
    if mask in ("attn", "both"):
        am = torch.rand(L, src, generator=g) < 0.4
        am[:, 0] = False
        out["attn_mask"] = am
    if mask == "attn_float":
        out["attn_mask"] = torch.randn(L, src, generator=g, dtype=DT)
    if mask == "attn3":
        batch = 1 if unbatched else N
        out["attn_mask"] = torch.randn(batch * HEADS, L, src, generator=g, dtype=DT)
    if mask == "causal":
        out["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
        out["is_causal"] = True
    return out


class Net(nn.Module):
    """Holds the attention as ``attn`` (so layer names agree: ``attn.q_proj``, …)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, query, key, value, **kwargs):
        return self.attn(query, key, value, **kwargs)


def loss_of(out: tuple[Tensor, Tensor | None]) -> Tensor:
    y, w = out
    weights = torch.linspace(-1.0, 2.0, y.shape[-1], dtype=y.dtype)
    loss = (y * weights).sin().sum() + 0.5 * (y**2).mean()
    if w is not None:
        loss = loss + (w * w).sum()
    return loss


def captured_statistics(net: nn.Module, inputs, kwargs, estimator: str) -> tuple[dict, object]:
    """Mean factors of every layer after one forward/backward: {name: (H, S)}."""
    opt = curvlab.CurvatureOptimizer(net, estimator=estimator, warn_on_fallback=False)
    loss_of(net(*inputs, **kwargs)).backward()
    stats = {
        r.name: (r.input_total / r.input_count, r.output_total / r.output_count)
        for r in opt.layers
        if r.has_statistics
    }
    return stats, opt


def kv_bias_reference(
    oracle: LinearAttention, name: str, per_sample: bool
) -> tuple[Tensor, Tensor]:
    """Block bias_k / bias_v from the oracle's hooked gradients: H = [1], S = Σ_n g_n² / N."""
    (g,) = oracle.kv_bias_grads[name]  # (N, 1, E): one row per sample
    g = g.reshape(-1, E)
    if per_sample:
        g = g * g.shape[0]
    return torch.ones(1, dtype=DT), (g * g).sum(0) / g.shape[0]


MODULE_OPTIONS = {
    "bias": {},
    "nobias": {"bias": False},
    "bias_kv": {"bias_kv": True},
    "zero_bias_kv": {"bias_kv": True, "zero_attn": True},
}


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
@pytest.mark.parametrize("mask", ["none", "both", "attn_float"])
@pytest.mark.parametrize("options", list(MODULE_OPTIONS))
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "sf"])
@pytest.mark.parametrize("kind", list(KIND_DIMS))
def test_block_factors_equal_the_linear_oracle(kind, batch_first, options, mask, estimator):
    bias = options != "nobias"
    mha = make_mha(kind, batch_first, **MODULE_OPTIONS[options])
    oracle = LinearAttention.from_mha(mha)
    inputs, kwargs = make_inputs(kind, batch_first), make_masks(mask, kind)
    got, opt = captured_statistics(Net(mha), inputs, kwargs, estimator)
    want, _ = captured_statistics(Net(oracle), inputs, kwargs, estimator)
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert set(want) == set(names)
    expected_blocks = names + (["attn.bias_k", "attn.bias_v"] if mha.bias_k is not None else [])
    assert sorted(got) == sorted(expected_blocks)
    for name in names:
        for a, b, what in zip(got[name], want[name], "HS"):
            assert a.shape == b.shape, (name, what)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} {what}")
    if estimator == "full":  # K-FAC factors are matrices, (1, d, d)
        assert got["attn.q_proj"][0].shape == (1, E + bias, E + bias)
    for name in ("bias_k", "bias_v") if mha.bias_k is not None else ():
        H, S_ = kv_bias_reference(oracle, name, per_sample=estimator == "full")
        torch.testing.assert_close(got[f"attn.{name}"][0], H, rtol=0, atol=0)
        torch.testing.assert_close(got[f"attn.{name}"][1], S_, rtol=1e-10, atol=1e-12)
    assert opt.fallback_parameters() == []


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
@pytest.mark.parametrize("mask", ["none", "kpm", "attn3"])
@pytest.mark.parametrize("kind", list(KIND_DIMS))
def test_unbatched_block_factors_equal_the_linear_oracle(kind, mask, estimator):
    mha = make_mha(kind, batch_first=True)
    oracle = LinearAttention.from_mha(mha)
    inputs = make_inputs(kind, True, unbatched=True)
    kwargs = make_masks(mask, kind, unbatched=True)
    got, _ = captured_statistics(Net(mha), inputs, kwargs, estimator)
    want, _ = captured_statistics(Net(oracle), inputs, kwargs, estimator)
    assert sorted(got) == sorted(want)
    for name in want:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_self_attention_reads_its_input_once(monkeypatch):
    """q, k, v share one input statistic in self-attention (the engine's input cache)."""
    calls = []
    original = AttentionProjection.input_diagonal

    def counting(self, module, x, output, dtype):
        calls.append(self.which)
        return original(self, module, x, output, dtype)

    monkeypatch.setattr(AttentionProjection, "input_diagonal", counting)
    mha = make_mha("self", True)
    opt = curvlab.AdaFisher(Net(mha))
    loss_of(Net.forward(opt.model, *make_inputs("self", True))).backward()
    assert calls == ["q"]
    calls.clear()
    loss_of(Net.forward(opt.model, *make_inputs("cross", True))).backward()  # key is value
    assert calls == ["q", "k"]


# -- whole trajectories: the MHA trains exactly as the oracle -----------------------------------
OPTIMIZERS = {
    "adafisher": dict(),
    "adafisherw_full": dict(estimator="full", inverse_interval=2),
    "kfac": dict(estimator="full", normalizer="identity", damping="factored", update_rule="kfac"),
    "banded": dict(estimator="banded", inverse_interval=1),
}


def train(net: nn.Module, batches, **options) -> curvlab.CurvatureOptimizer:
    opt = curvlab.CurvatureOptimizer(net, lr=1e-4, weight_decay=1e-2, **options)
    for inputs, kwargs in batches:
        opt.zero_grad()
        loss_of(net(*inputs, **kwargs)).backward()
        opt.step()
    return opt


def oracle_parameters(mha: nn.MultiheadAttention) -> dict[str, Tensor]:
    """The MHA's parameters, as the oracle's Linear layers hold them."""
    return dict(LinearAttention.from_mha(mha).named_parameters())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind,batch_first", [("self", True), ("cross", False), ("kvdim", True)])
def test_training_equals_the_linear_oracle(kind, batch_first, optimizer):
    mha = make_mha(kind, batch_first)
    oracle = LinearAttention.from_mha(mha)
    batches = [
        (make_inputs(kind, batch_first, seed=s), make_masks("both", kind, seed=s + 7))
        for s in range(4)
    ]
    opt = train(Net(mha), batches, **OPTIMIZERS[optimizer])
    train(Net(oracle), batches, **OPTIMIZERS[optimizer])
    for name, p in oracle_parameters(mha).items():
        torch.testing.assert_close(
            p, dict(oracle.named_parameters())[name], rtol=1e-10, atol=1e-12, msg=name
        )
    # the packed parameter's preconditioner is the three blocks' preconditioners, row by row
    precond = opt.preconditioner(
        mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
    )
    assert precond.shape[0] in (E, 3 * E)
    assert not torch.allclose(precond, torch.full_like(precond, 1 + 1e-3))


def test_tied_packed_weight_sums_the_blocks_curvatures():
    """Two attentions sharing in_proj_weight: each row block gets F₁ + F₂ + λ, as two oracles
    sharing their q/k/v Linear weights do (the tied-weights rule, block by block)."""

    class Two(nn.Module):
        def __init__(self, a: nn.Module, b: nn.Module) -> None:
            super().__init__()
            self.a, self.b = a, b

        def forward(self, query, key, value, **kwargs):
            ya, _ = self.a(query, key, value, **kwargs)
            yb, _ = self.b(ya, ya, ya, **kwargs)
            return yb, None

    a, b = make_mha("self", True), make_mha("self", True)
    b.in_proj_weight = a.in_proj_weight
    oa, ob = LinearAttention.from_mha(a), LinearAttention.from_mha(b)
    for proj in ("q_proj", "k_proj", "v_proj"):
        getattr(ob, proj).weight = getattr(oa, proj).weight
    batches = [(make_inputs("self", True, seed=s), {}) for s in range(3)]
    opt = train(Two(a, b), batches)
    want = train(Two(oa, ob), batches)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * E, (i + 1) * E)
        torch.testing.assert_close(
            a.in_proj_weight[rows], getattr(oa, proj).weight, rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            opt.preconditioner(a.in_proj_weight)[rows],
            want.preconditioner(getattr(oa, proj).weight),
            rtol=1e-10,
            atol=1e-12,
        )


# -- exactness of the observed forward ----------------------------------------------------------
def share_like(inputs) -> list[Tensor]:
    """Fresh leaves with the same identities as ``inputs`` (self-attention passes one tensor)."""
    leaves: dict[int, Tensor] = {}
    return [leaves.setdefault(id(x), x.detach().clone().requires_grad_()) for x in inputs]


def outputs_and_grads(module: nn.Module, inputs, kwargs, seed: int = 3):
    leaves = share_like(inputs)
    torch.manual_seed(seed)
    out = module(*leaves, **kwargs)
    loss_of(out).backward()
    unique = list({id(x): x for x in leaves}.values())
    return out, [x.grad for x in unique] + [p.grad for p in module.parameters()]


def assert_exact(hooked: nn.Module, plain: nn.Module, inputs, kwargs) -> None:
    out_h, grads_h = outputs_and_grads(hooked, inputs, kwargs)
    out_p, grads_p = outputs_and_grads(plain, inputs, kwargs)
    for a, b in zip(out_h, out_p, strict=True):
        if b is None:
            assert a is None
        else:  # memory layout too: a later dropout draws its mask in memory order
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            assert a.stride() == b.stride()
    for a, b in zip(grads_h, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


MASKS = ["none", "kpm", "kpm_float", "attn", "attn_float", "attn3", "both", "causal"]
WEIGHTS = {
    "no_weights": dict(need_weights=False),
    "averaged": dict(need_weights=True),
    "per_head": dict(need_weights=True, average_attn_weights=False),
}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize(
    "kind,mask", [(k, m) for k in KIND_DIMS for m in MASKS if m != "causal" or k == "self"]
)  # a causal mask is square: self-attention only
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "sf"])
def test_observed_forward_is_the_modules_forward(kind, batch_first, mask, weights):
    mha = make_mha(kind, batch_first, dropout=0.3)
    plain = copy.deepcopy(mha)
    opt = curvlab.AdaFisher(mha, warn_on_fallback=False)
    kwargs = {**make_masks(mask, kind), **WEIGHTS[weights]}
    assert_exact(mha, plain, make_inputs(kind, batch_first), kwargs)
    assert all(r.has_statistics for r in opt.layers)  # it was captured


@pytest.mark.parametrize("bias,bias_kv,zero_attn", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("kind", list(KIND_DIMS))
def test_observed_forward_is_exact_for_every_module_option(kind, bias, bias_kv, zero_attn):
    for batch_first, unbatched, mask, weights in [
        (True, False, "both", "averaged"),
        (False, False, "kpm", "no_weights"),
        (True, True, "attn3", "per_head"),
        (False, True, "kpm", "no_weights"),
    ]:
        mha = make_mha(kind, batch_first, bias, bias_kv, zero_attn, dropout=0.2)
        plain = copy.deepcopy(mha)
        curvlab.AdaFisher(mha, warn_on_fallback=False)
        kwargs = {**make_masks(mask, kind, unbatched), **WEIGHTS[weights]}
        assert_exact(mha, plain, make_inputs(kind, batch_first, unbatched), kwargs)


def test_errors_are_the_modules_errors():
    """Bad input raises what nn.MultiheadAttention raises (type and message)."""
    mha = make_mha("self", True)
    plain = copy.deepcopy(mha)
    curvlab.AdaFisher(mha)
    x = make_inputs("self", True)[0]
    bad = [
        dict(attn_mask=torch.zeros(L + 1, L, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(2, L, L, dtype=torch.bool)),
        dict(key_padding_mask=torch.zeros(N, L, dtype=torch.int64)),
        dict(is_causal=True),
    ]
    for kwargs in bad:
        with pytest.raises(Exception) as want:
            plain(x, x, x, **kwargs)
        with pytest.raises(type(want.value)) as got:
            mha(x, x, x, **kwargs)
        assert str(got.value) == str(want.value)


def test_capture_is_off_in_eval_no_grad_and_other_steps(monkeypatch):
    """Outside a capturing forward the module's own forward runs (the observed one not at all)."""
    from curvlab.plugins.adapters import attention

    calls = []
    original = attention.observed_forward
    monkeypatch.setattr(
        attention, "observed_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    mha = make_mha("self", True)
    opt = curvlab.AdaFisher(mha, curvature_interval=2)
    x = make_inputs("self", True)[0]
    with torch.no_grad():
        mha(x, x, x)
    mha.eval()
    mha(x, x, x)
    mha.train()
    with opt.pause_capture():
        mha(x, x, x)
    assert calls == []
    loss_of(mha(x, x, x)).backward()
    assert calls == [1]
    opt.step()  # step 1: not a curvature step
    loss_of(mha(x, x, x)).backward()
    assert calls == [1]


def test_adapter_blocks_and_parameters():
    mha = make_mha("kvdim", True, bias_kv=True)
    blocks = MultiheadAttentionAdapter().blocks(mha)
    assert list(blocks) == ["q_proj", "k_proj", "v_proj", "bias_k", "bias_v"]
    assert isinstance(blocks["bias_k"], AttentionKVBias)
    assert blocks["k_proj"].parameters(mha)["weight"] is mha.k_proj_weight
    assert blocks["k_proj"].regions(mha) == {"bias": slice(E, 2 * E)}
    packed = make_mha("self", True)
    assert blocks["v_proj"].regions(packed) == {
        "weight": slice(2 * E, 3 * E),
        "bias": slice(2 * E, 3 * E),
    }

    class Custom(nn.MultiheadAttention):  # another forward: not this adapter's to reproduce
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert not MultiheadAttentionAdapter().matches(Custom(E, HEADS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = curvlab.AdaFisher(Custom(E, HEADS))
    assert any("no adapter for Custom" in str(w.message) for w in caught)
    assert {f.name for f in opt.fallback_parameters()} == {"in_proj_weight", "in_proj_bias"}


def test_block_curvature_is_the_squared_gradient_for_one_row():
    """One query row, one key row: each block's F = S ⊗ H is the squared gradient of its rows
    of the parameters (bias_k / bias_v: S alone)."""
    mha = make_mha("kvdim", True, bias_kv=True)
    opt = curvlab.CurvatureOptimizer(mha, normalizer="identity", gamma=0.0)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, d, generator=g, dtype=DT) for d in (E, 6, 7))
    y, _ = mha(q, k, v)
    (y * torch.randn(y.shape, generator=g, dtype=DT)).sum().backward()
    opt.step()
    lam = 1e-3
    for p in (mha.q_proj_weight, mha.k_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v):
        want = p.grad**2
        torch.testing.assert_close(opt.preconditioner(p) - lam, want, rtol=1e-10, atol=1e-14)
