"""Models that pairing parameters with layers *by position* (the official AdaFisher code) gets
wrong: tied weights, frozen layers, root parameters, nn.MultiheadAttention, nested modules, a
module reused twice, in-place activations, several param groups.

curvlab pairs by identity (SPEC §2): these tests check that every trainable parameter is
updated, frozen ones are not, and that ``opt.preconditioner(p)`` is what the documented rule
says (tied: sum of the layers' curvatures + λ; unsupported: 1 + λ, reported with a reason).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import CurvatureFallbackWarning
from curvlab.optimizer import PAPER_ADAPTERS

LAM = 1e-3


# -- helpers ------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, opt, batches, loss_fn=F.cross_entropy):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()


def assert_all_trainable_updated(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(before[name], p.detach()), f"{name} was not updated"
            assert torch.isfinite(p).all(), name


def fallback_names(opt) -> dict[str, str]:
    return {f.name: f.reason for f in opt.fallback_parameters()}


def fallback_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, CurvatureFallbackWarning)]


def regression_batches(n_batches, n, d_in, n_out, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, n_out, (n,), generator=g))
        for _ in range(n_batches)
    ]


# -- tied weights -------------------------------------------------------------------------------
class TinyGPT(nn.Module):
    """Embedding → LayerNorm → MLP residual → Linear head; the head may share the embedding."""

    def __init__(self, vocab: int = 11, d: int = 6, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + torch.tanh(self.mlp(self.ln(h)))
        return self.head(h)


def untied_copy(tied: TinyGPT) -> TinyGPT:
    vocab, d = tied.emb.weight.shape
    untied = TinyGPT(vocab, d, tie=False).to(tied.emb.weight.dtype)
    with torch.no_grad():
        for name, p in untied.named_parameters():
            source = "emb.weight" if name == "head.weight" else name
            p.copy_(dict(tied.named_parameters())[source])
    return untied


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def token_batch(vocab=11, n=4, t=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(
        0, vocab, (n, t), generator=g
    )


def test_tied_embedding_and_head_get_the_sum_of_both_curvatures():
    tied = TinyGPT().double()
    untied = untied_copy(tied)
    assert tied.head.weight is tied.emb.weight
    assert untied.head.weight is not untied.emb.weight

    opt_t = curvlab.AdaFisher(tied, lr=1e-2, damping=LAM)
    opt_u = curvlab.AdaFisher(untied, lr=1e-2, damping=LAM)
    # both layers that use the shared tensor are hooked; the tensor is optimized once
    assert {r.name for r in opt_t.layers} >= {"emb", "head"}
    assert sum(p is tied.emb.weight for g in opt_t.param_groups for p in g["params"]) == 1
    assert opt_t.fallback_parameters() == []

    idx, targets = token_batch()
    before = snapshot(tied)
    for model, opt in ((tied, opt_t), (untied, opt_u)):
        opt.zero_grad(set_to_none=True)
        lm_loss(model(idx), targets).backward()
        opt.step()
    assert_all_trainable_updated(tied, before)

    # same forward/backward, so each layer's statistics are the same in the two models
    F_emb = opt_u.preconditioner(untied.emb.weight)
    F_head = opt_u.preconditioner(untied.head.weight)
    F_tied = opt_t.preconditioner(tied.emb.weight)
    assert F_tied.shape == tied.emb.weight.shape
    torch.testing.assert_close(F_tied, (F_emb - LAM) + (F_head - LAM) + LAM, rtol=1e-12, atol=1e-15)
    # and it is a real sum: neither layer alone
    assert not torch.allclose(F_tied, F_emb) and not torch.allclose(F_tied, F_head)

    # the shared tensor was stepped once, with the summed preconditioner (first step: m̂ = g)
    grad = tied.emb.weight.grad
    torch.testing.assert_close(
        tied.emb.weight.detach(),
        before["emb.weight"] - 1e-2 * grad / F_tied,
        rtol=1e-10,
        atol=1e-13,
    )


# -- frozen layer -------------------------------------------------------------------------------
def mlp(widths=(4, 8, 8, 3), dtype=torch.float64) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def test_frozen_layer_is_not_updated_and_does_not_shift_the_pairing():
    model = mlp()
    reference = copy.deepcopy(model)  # nothing frozen: same statistics for the other layers
    model[2].requires_grad_(False)

    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)  # a frozen layer is no fallback
        opt = curvlab.AdaFisher(model, lr=1e-2)
    opt_ref = curvlab.AdaFisher(reference, lr=1e-2)
    assert [r.name for r in opt.layers] == ["0", "4"]
    assert len(model[2]._forward_hooks) == 0  # a frozen layer is not even hooked

    before = snapshot(model)
    batch = regression_batches(1, 16, 4, 3)
    train_steps(model, opt, batch)
    train_steps(reference, opt_ref, batch)

    assert torch.equal(model[2].weight, before["2.weight"])
    assert torch.equal(model[2].bias, before["2.bias"])
    for name in ("0.weight", "0.bias", "4.weight", "4.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert opt.fallback_parameters() == []
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.preconditioner(model[2].weight)
    # the last layer's curvature is its own (a positional pairing would hand it layer 2's)
    for p, q in ((model[4].weight, reference[4].weight), (model[4].bias, reference[4].bias)):
        torch.testing.assert_close(opt.preconditioner(p), opt_ref.preconditioner(q))
    for p, q in ((model[0].weight, reference[0].weight), (model[0].bias, reference[0].bias)):
        torch.testing.assert_close(opt.preconditioner(p), opt_ref.preconditioner(q))


# -- extra root parameter -----------------------------------------------------------------------
class ScaledMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


@pytest.mark.parametrize("variant, expected", [("paper", 1.0 + LAM), ("official", 1.0)])
def test_root_parameter_falls_back_to_identity_and_is_reported_once(variant, expected):
    model = ScaledMLP().double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = curvlab.AdaFisher(model, lr=1e-2, damping=LAM, variant=variant, curvature_interval=1)
        before = snapshot(model)
        train_steps(model, opt, regression_batches(3, 16, 4, 3))
    found = fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "scale" in str(found[0].message)

    assert_all_trainable_updated(model, before)
    reasons = fallback_names(opt)
    assert list(reasons) == ["scale"]
    assert "ScaledMLP" in reasons["scale"]  # the reason names the unsupported module
    F_scale = opt.preconditioner(model.scale)
    assert torch.equal(F_scale, torch.full_like(model.scale, expected))
    # supported layers do have curvature
    assert not torch.all(opt.preconditioner(model.fc1.weight) == expected)


def test_parameter_outside_the_model_falls_back_with_a_reason():
    model = mlp((4, 8, 3))
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.warns(CurvatureFallbackWarning):
        opt = curvlab.AdaFisher(model, params=list(model.parameters()) + [extra], damping=LAM)
    (fallback,) = opt.fallback_parameters()
    assert fallback.shape == (3,) and "not a parameter of the model" in fallback.reason
    x, y = regression_batches(1, 8, 4, 3)[0]
    opt.zero_grad()
    (F.cross_entropy(model(x) * extra, y)).backward()
    opt.step()
    assert not torch.equal(extra, torch.ones_like(extra))
    assert torch.equal(opt.preconditioner(extra), torch.full_like(extra, 1 + LAM))


# -- nn.MultiheadAttention ----------------------------------------------------------------------
class AttentionNet(nn.Module):
    def __init__(self, d_in: int = 5, d: int = 8, heads: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a.mean(1))


def test_multihead_attention_parameters_fall_back_with_reasons():
    model = AttentionNet().double()
    g = torch.Generator().manual_seed(5)
    batches = [
        (
            torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=g),
        )
        for _ in range(3)
    ]
    with warnings.catch_warnings(record=True) as at_init:
        warnings.simplefilter("always")
        # without the multihead_attention adapter (the default covers it:
        # tests/plugins/adapters/test_attention.py), the fallback is reported
        adapters = [a for a in PAPER_ADAPTERS if a != "multihead_attention"]
        opt = curvlab.AdaFisher(model, lr=1e-2, damping=LAM, adapters=adapters)
    init_warnings = fallback_warnings(at_init)
    assert len(init_warnings) == 1
    assert "in_proj_weight" in str(init_warnings[0].message)

    # before any step only the parameters without an adapter are listed
    assert set(fallback_names(opt)) == {"attn.in_proj_weight", "attn.in_proj_bias"}

    before = snapshot(model)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        train_steps(model, opt, batches[:1])
    first_warnings = fallback_warnings(first)
    assert len(first_warnings) == 1  # out_proj is a Linear whose hooks never fired
    assert "attn.out_proj" in str(first_warnings[0].message)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        train_steps(model, opt, batches[1:])
    assert fallback_warnings(later) == []  # not repeated every step

    assert_all_trainable_updated(model, before)
    reasons = fallback_names(opt)
    assert set(reasons) == {
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
    }
    assert all(reason for reason in reasons.values())
    assert "MultiheadAttention" in reasons["attn.in_proj_weight"]
    for p in (
        model.attn.in_proj_weight,
        model.attn.in_proj_bias,
        model.attn.out_proj.weight,
        model.attn.out_proj.bias,
    ):
        assert torch.equal(opt.preconditioner(p), torch.full_like(p, 1.0 + LAM))
    for p in (model.inp.weight, model.out.weight):
        assert not torch.all(opt.preconditioner(p) == 1.0 + LAM)


# -- nested custom modules ----------------------------------------------------------------------
class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x)))


class Middle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.fc(self.inner(x)))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mid = Middle()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.mid(x))


def test_nested_custom_modules_are_paired_by_identity():
    model = Outer().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureFallbackWarning)
        opt = curvlab.AdaFisher(model, lr=1e-2, damping=LAM)
        before = snapshot(model)
        train_steps(model, opt, regression_batches(2, 16, 4, 3))
    assert {r.name for r in opt.layers} == {"mid.inner.fc", "mid.inner.norm", "mid.fc", "head"}
    by_name = {r.name: r for r in opt.layers}
    assert by_name["mid.inner.fc"].module is model.mid.inner.fc
    assert by_name["mid.inner.fc"].params["weight"] is model.mid.inner.fc.weight
    assert opt.fallback_parameters() == []
    assert_all_trainable_updated(model, before)
    for name, p in model.named_parameters():
        F_p = opt.preconditioner(p)
        assert F_p.shape == p.shape, name
        assert bool((F_p >= LAM).all()), name
        assert not torch.all(F_p == 1.0 + LAM), f"{name} has no curvature"


# -- a module reused twice in one forward -------------------------------------------------------
class Reused(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_module_reused_twice_accumulates_both_calls():
    model = Reused().double()
    hand = copy.deepcopy(model)  # before any hook is attached
    x, y = regression_batches(1, 8, 4, 3)[0]

    # hand computation: rows of both calls, mean over all of them (gamma=0: state = this step's)
    x1 = x
    z1 = hand.fc(x1)
    z1.retain_grad()
    x2 = torch.tanh(z1)
    z2 = hand.fc(x2)
    z2.retain_grad()
    F.cross_entropy(hand.head(torch.tanh(z2)), y).backward()
    a = torch.cat([x1, x2]).detach()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)  # the bias entry
    H_hand = (a * a).mean(0)
    g = torch.cat([z1.grad, z2.grad])
    S_hand = (g * g).mean(0)

    opt = curvlab.AdaFisher(model, lr=1e-2, gamma=0.0)
    before = snapshot(model)
    train_steps(model, opt, [(x, y)])
    assert_all_trainable_updated(model, before)
    state = opt.curvature_state["fc"]
    torch.testing.assert_close(state["H"], H_hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["S"], S_hand, rtol=1e-12, atol=1e-14)
    # not just the last call's rows
    H_last = (a[len(x) :] ** 2).mean(0)
    assert not torch.allclose(state["H"], H_last)


# -- in-place activations -----------------------------------------------------------------------
def inplace_net(inplace: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 10),
        nn.ReLU(inplace=inplace),
        nn.Linear(10, 3),
    )


def test_inplace_relu_does_not_corrupt_the_captured_output_gradient():
    plain = inplace_net(False).double()
    inplace = inplace_net(True).double()
    inplace.load_state_dict(plain.state_dict())

    g = torch.Generator().manual_seed(7)
    batches = [
        (
            torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(3)
    ]
    opt_plain = curvlab.AdaFisher(plain, lr=1e-2)
    opt_inplace = curvlab.AdaFisher(inplace, lr=1e-2)
    train_steps(plain, opt_plain, batches[:1])
    train_steps(inplace, opt_inplace, batches[:1])
    assert set(opt_inplace.curvature_state) == {"0", "2", "5", "7"}
    for name, state in opt_plain.curvature_state.items():
        for key in ("H", "S"):
            torch.testing.assert_close(
                opt_inplace.curvature_state[name][key],
                state[key],
                rtol=1e-12,
                atol=1e-15,
                msg=f"layer {name} factor {key}",
            )
    # and training goes on identically
    train_steps(plain, opt_plain, batches[1:])
    train_steps(inplace, opt_inplace, batches[1:])
    for p, q in zip(plain.parameters(), inplace.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_inplace_relu_output_gradient_matches_a_hand_computation():
    model = inplace_net(True).double()
    hand = inplace_net(False).double()
    hand.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    z = hand[0](x)
    z.retain_grad()
    F.cross_entropy(hand[1:](z), y).backward()
    S_hand = (z.grad**2).sum((0, 2, 3)) / (6 * 5 * 5)

    opt = curvlab.AdaFisher(model, lr=1e-2, gamma=0.0)
    train_steps(model, opt, [(x, y)])
    torch.testing.assert_close(opt.curvature_state["0"]["S"], S_hand, rtol=1e-12, atol=1e-15)


# -- several param groups -----------------------------------------------------------------------
def test_param_groups_with_their_own_lr_and_weight_decay():
    model = mlp((4, 8, 3))
    ref_a, ref_b = copy.deepcopy(model), copy.deepcopy(model)
    opt = curvlab.AdaFisher(
        model,
        params=[
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "lr": 1e-3, "weight_decay": 0.1},
        ],
        lr=5e-2,
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    opt_a = curvlab.AdaFisher(ref_a, lr=1e-2)
    opt_b = curvlab.AdaFisher(ref_b, lr=1e-3, weight_decay=0.1)
    batch = regression_batches(1, 16, 4, 3)
    before = snapshot(model)
    for m, o in ((model, opt), (ref_a, opt_a), (ref_b, opt_b)):
        train_steps(m, o, batch)
    assert_all_trainable_updated(model, before)
    # first step: identical statistics, so each group matches the single-group run of its settings
    for p, q in zip(model[0].parameters(), ref_a[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)
    for p, q in zip(model[2].parameters(), ref_b[2].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)
    assert not torch.allclose(model[2].weight, ref_a[2].weight)
