"""The adapter extension points on a toy layer (not attention): ``blocks``, ``regions`` and
``capture_forward`` (docs/plugins.md, "Layers with several Kronecker blocks …").

``PackedPair`` applies the two row halves of one packed weight functionally to two inputs; its
adapter describes it as two blocks. Trained with any estimator it must equal the same model
built from two ``nn.Linear`` layers (float64, 1e-10); tied and partly overlapping uses of a
packed parameter get the summed diagonal curvature; bad regions are rejected when pairing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.interfaces import LayerAdapter, Statistic
from curvlab.interfaces.adapter import square_sum
from curvlab.layers import LayerRecord
from curvlab.regions import shared_parameters

DT = torch.float64
IN, OUT = 5, 4


class PackedPair(nn.Module):
    """y = (W[:OUT] x₁ + b[:OUT]) ⊙ (W[OUT:] x₂ + b[OUT:]), computed functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * OUT, IN, dtype=DT) / IN**0.5)
        self.bias = nn.Parameter(0.3 * torch.randn(2 * OUT, dtype=DT))

    def forward(self, x1, x2):
        w1, w2 = self.weight.chunk(2)
        b1, b2 = self.bias.chunk(2)
        return F.linear(x1, w1, b1) * F.linear(x2, w2, b2)


class TwoLinears(nn.Module):
    """The oracle: the same model from two verified nn.Linear layers (named like the blocks)."""

    def __init__(self, packed: PackedPair) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(IN, OUT).double(), nn.Linear(IN, OUT).double()
        with torch.no_grad():
            for i, layer in enumerate((self.first, self.second)):
                layer.weight.copy_(packed.weight[i * OUT : (i + 1) * OUT])
                layer.bias.copy_(packed.bias[i * OUT : (i + 1) * OUT])

    def forward(self, x1, x2):
        return self.first(x1) * self.second(x2)


class HalfBlock(LayerAdapter):
    """Rows ``index·OUT : (index+1)·OUT`` of the packed weight and bias: a Linear block."""

    module_types = (PackedPair,)

    def __init__(self, index: int, rows: bool = True) -> None:
        self.index = index
        self.rows = rows

    def regions(self, module):
        span = slice(self.index * OUT, (self.index + 1) * OUT)
        return {"weight": span, "bias": span}

    def input_diagonal(self, module, x, output, dtype):
        r = x.reshape(-1, IN)
        total = square_sum(r, 0, dtype)
        return Statistic(torch.cat([total, total.new_full((1,), r.shape[0])]), r.shape[0])

    def output_diagonal(self, module, grad_output, dtype):
        g = grad_output.reshape(-1, OUT)
        return Statistic(square_sum(g, 0, dtype), g.shape[0])

    @property
    def supports_rows(self) -> bool:
        return self.rows

    def input_rows(self, module, x):
        r = x.reshape(-1, IN)
        return torch.cat([r, r.new_ones(r.shape[0], 1)], dim=1)[None]

    def output_rows(self, module, grad_output):
        return grad_output.reshape(-1, OUT)

    def curvature_terms(self, module, H, S):
        return {"weight": (S[:, None], H[None, :IN]), "bias": (S, H[IN:])}

    def to_matrix(self, module, tensors):
        return torch.cat([tensors["weight"], tensors["bias"][:, None]], dim=1)[None]

    def from_matrix(self, module, matrix):
        matrix = matrix.reshape(OUT, IN + 1)
        return {"weight": matrix[:, :IN], "bias": matrix[:, IN]}

    def capture_forward(self, module, observe, x1, x2):
        w1, w2 = module.weight.chunk(2)
        b1, b2 = module.bias.chunk(2)
        y1, y2 = F.linear(x1, w1, b1), F.linear(x2, w2, b2)
        observe("first", x1, y1)
        observe("second", x2, y2)
        return y1 * y2


class PackedPairAdapter(LayerAdapter):
    module_types = (PackedPair,)

    def __init__(self, spans=((0, 1), (1, 2)), rows: bool = True, second_rows: bool = True):
        self.spans, self.rows, self.second_rows = spans, rows, second_rows

    def blocks(self, module):
        first, second = HalfBlock(0, self.rows), HalfBlock(1, self.second_rows)
        if self.spans != ((0, 1), (1, 2)):  # bad layouts, for the pairing check
            first.regions = lambda m, s=self.spans[0]: {
                "weight": slice(s[0] * OUT, s[1] * OUT),
                "bias": slice(s[0] * OUT, s[1] * OUT),
            }
            second.regions = lambda m, s=self.spans[1]: {
                "weight": slice(s[0] * OUT, s[1] * OUT),
                "bias": slice(s[0] * OUT, s[1] * OUT),
            }
        return {"first": first, "second": second}

    def parameters(self, module):
        return {"weight": module.weight, "bias": module.bias}

    def input_diagonal(self, module, x, output, dtype):
        raise TypeError("per block")

    def output_diagonal(self, module, grad_output, dtype):
        raise TypeError("per block")


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(6, 3, IN, generator=g, dtype=DT), torch.randn(6, 3, IN, generator=g, dtype=DT))
        for _ in range(n)
    ]


def train(model, **options):
    opt = curvlab.CurvatureOptimizer(model, lr=1e-3, weight_decay=1e-2, **options)
    target = torch.linspace(-1, 1, OUT, dtype=DT)
    for x1, x2 in batches():
        opt.zero_grad()
        ((model(x1, x2) - target) ** 2).mean().backward()
        opt.step()
    return opt


OPTIONS = {
    "adafisher": dict(),
    "full": dict(estimator="full", inverse_interval=1),
    "kfac": dict(estimator="full", normalizer="identity", damping="factored", update_rule="kfac"),
    "banded": dict(estimator="banded"),
    "after_root": dict(
        damping=curvlab.registry.create("damping", "constant", value=1e-3, mode="after_root")
    ),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_blocks_of_a_packed_functional_layer_train_like_separate_linears(name):
    torch.manual_seed(0)
    packed = PackedPair()
    oracle = TwoLinears(packed)
    opt = train(packed, adapters=[PackedPairAdapter()], **OPTIONS[name])
    want = train(oracle, adapters=["linear"], **OPTIONS[name])
    assert [r.name for r in opt.layers] == ["first", "second"]
    assert opt.fallback_parameters() == [] and opt._shared == set()
    for i, layer in enumerate((oracle.first, oracle.second)):
        rows = slice(i * OUT, (i + 1) * OUT)
        torch.testing.assert_close(packed.weight[rows], layer.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(packed.bias[rows], layer.bias, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            opt.preconditioner(packed.weight)[rows],
            want.preconditioner(layer.weight),
            rtol=1e-10,
            atol=1e-12,
        )
    # the functional forward is observed only while capturing; detach removes the override
    assert "forward" in packed.__dict__
    opt.backend.detach()
    assert "forward" not in packed.__dict__


def test_state_dict_of_blocks_resumes_bitwise():
    torch.manual_seed(0)
    packed = PackedPair()
    twin = copy.deepcopy(packed)
    opt = train(packed, adapters=[PackedPairAdapter()], estimator="full")
    state = copy.deepcopy(opt.state_dict())
    assert set(state["curvature"]["layers"]) == {"first", "second"}
    other = curvlab.CurvatureOptimizer(
        twin, adapters=[PackedPairAdapter()], estimator="full", lr=1e-3, weight_decay=1e-2
    )
    with torch.no_grad():
        twin.weight.copy_(packed.weight)
        twin.bias.copy_(packed.bias)
    other.load_state_dict(state)
    for model, o in ((packed, opt), (twin, other)):
        x1, x2 = batches(1)[0]
        o.zero_grad()
        model(x1, x2).square().sum().backward()
        o.step()
    assert torch.equal(packed.weight, twin.weight) and torch.equal(packed.bias, twin.bias)


@pytest.mark.parametrize("spans", [((0, 1), (0, 2)), ((0, 1), (2, 2))], ids=["overlap", "gap"])
def test_blocks_must_cover_a_packed_parameter_exactly_once(spans):
    with pytest.raises(ValueError, match=r"PackedPairAdapter.*exactly once"):
        curvlab.AdaFisher(PackedPair(), adapters=[PackedPairAdapter(spans=spans)])


def test_blocks_of_different_structures_make_the_parameter_shared():
    """One block with rows (full), one without (diagonal): no joint solve can cover the packed
    parameter, so both use the diagonals of their factors, summed per row block."""
    packed = PackedPair()
    opt = train(packed, adapters=[PackedPairAdapter(second_rows=False)], estimator="full")
    assert [r.structure for r in opt.layers] == ["full", "diagonal"]
    assert opt._shared == {id(packed.weight), id(packed.bias)}
    lam = 1e-3
    factors = opt._layer_factors(lam)
    first, second = factors["first"], factors["second"]
    # diag(Q diag(Λ) Qᵀ) of the first block's normalised factors, from its eigenbasis
    state = opt.curvature_state["first"]
    assert bool(state["eigen_valid"])
    LH, LS = (opt.normalizer(state[k], "spectrum") for k in ("LH", "LS"))
    H1 = ((state["QH"] * state["QH"]) @ LH.unsqueeze(-1)).squeeze(-1)[0]
    S1 = ((state["QS"] * state["QS"]) @ LS.unsqueeze(-1)).squeeze(-1)[0]
    got_H, got_S = first.factor_diagonals()
    torch.testing.assert_close(got_H[0], H1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_S[0], S1, rtol=1e-12, atol=1e-15)
    want = torch.cat([S1[:, None] * H1[None, :IN], second.S[:, None] * second.H[None, :IN]]) + lam
    torch.testing.assert_close(opt.preconditioner(packed.weight), want, rtol=1e-12, atol=1e-15)


def test_a_packed_parameter_also_used_whole_sums_every_use():
    """The packed weight is also the weight of an nn.Linear (used whole): F = F_linear + the
    block of each row + λ (the zero-then-add path of the preconditioner)."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = PackedPair()
            self.lin = nn.Linear(IN, 2 * OUT).double()
            self.lin.weight = self.pair.weight

        def forward(self, x1, x2):
            return self.pair(x1, x2) + self.lin(x1)[..., :OUT]

    model = Both()
    opt = train(model, adapters=[PackedPairAdapter(), "linear"])
    assert id(model.pair.weight) in opt._shared
    f = opt._layer_factors()
    lin = f["lin"].S[:, None] * f["lin"].H[None, :IN]
    blocks = torch.cat([f[b].S[:, None] * f[b].H[None, :IN] for b in ("pair.first", "pair.second")])
    torch.testing.assert_close(
        opt.preconditioner(model.pair.weight), lin + blocks + 1e-3, rtol=1e-12, atol=1e-15
    )


def test_shared_parameters_rule():
    p = nn.Parameter(torch.zeros(6, 2))
    q = nn.Parameter(torch.zeros(3))

    def record(name, params, regions=None, structure="full"):
        r = LayerRecord(name, nn.Identity(), None, params, structure=structure)
        r.regions = regions or {}
        return r

    tiles = [record("a", {"w": p}, {"w": slice(0, 3)}), record("b", {"w": p}, {"w": slice(3, 6)})]
    assert shared_parameters(tiles) == set()
    overlap = [record("a", {"w": p}, {"w": slice(0, 4)}), record("b", {"w": p}, {"w": slice(3, 6)})]
    assert shared_parameters(overlap) == {id(p)}
    whole = [record("a", {"w": p}), record("b", {"w": p}, {"w": slice(3, 6)})]
    assert shared_parameters(whole) == {id(p)}
    mixed = [
        record("a", {"w": p}, {"w": slice(0, 3)}),
        record("b", {"w": p}, {"w": slice(3, 6)}, structure="diagonal"),
    ]
    assert shared_parameters(mixed) == {id(p)}
    tied = [record("a", {"b": q}), record("b", {"b": q})]
    assert shared_parameters(tied) == {id(q)}


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
def test_a_packed_parameter_falls_back_whole_until_every_block_is_captured(estimator):
    """Rows of a block without factors must not get λ alone (the largest step): until every
    block of a packed parameter has been captured, the whole parameter keeps F = 1 + λ."""

    class FirstOnly(HalfBlock):
        skip_second = True

        def capture_forward(self, module, observe, x1, x2):
            w1, w2 = module.weight.chunk(2)
            b1, b2 = module.bias.chunk(2)
            y1, y2 = F.linear(x1, w1, b1), F.linear(x2, w2, b2)
            observe("first", x1, y1)
            if not FirstOnly.skip_second:
                observe("second", x2, y2)
            return y1 * y2

    class Adapter(PackedPairAdapter):
        def blocks(self, module):
            return {"first": FirstOnly(0), "second": FirstOnly(1)}

    packed = PackedPair()
    opt = curvlab.CurvatureOptimizer(packed, adapters=[Adapter()], estimator=estimator, lr=1e-3)
    x1, x2 = batches(1)[0]
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="second"):
        packed(x1, x2).square().sum().backward()
        opt.step()
    for p in (packed.weight, packed.bias):
        assert torch.equal(opt.preconditioner(p), torch.full_like(p, 1 + 1e-3))
    FirstOnly.skip_second = False
    opt.zero_grad()
    packed(x1, x2).square().sum().backward()
    opt.step()
    F_w = opt.preconditioner(packed.weight)
    assert not torch.any(F_w == 1 + 1e-3) and torch.all(F_w >= 1e-3)
