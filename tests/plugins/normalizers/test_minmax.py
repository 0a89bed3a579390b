"""MinMaxNormalizer: ``(x − min x) / (max x − min x + ε)`` over the whole factor, ε = 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab.plugins.normalizers.minmax import MinMaxNormalizer

DT = torch.float64


def by_hand(values: list[float], eps: float = 1e-6) -> list[float]:
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo + eps) for v in values]


@pytest.mark.parametrize(
    "values",
    [[0.3, 2.0, 1.0, 0.5], [1e-3, 2e-3, 1.5e-3], [5.0, -1.0, 4.0, 1.0], [7.0], [2.0, 2.0, 2.0]],
    ids=["generic", "small_range", "negative", "single", "constant"],
)
def test_formula(values):
    out = MinMaxNormalizer()(torch.tensor(values, dtype=DT))
    torch.testing.assert_close(out, torch.tensor(by_hand(values), dtype=DT), rtol=1e-14, atol=0)


def test_range_and_extremes():
    x = torch.rand(50, dtype=DT) * 10
    y = MinMaxNormalizer()(x)
    assert y.min().item() == 0.0
    assert y[x.argmin()] == 0.0
    top = y[x.argmax()].item()
    span = (x.max() - x.min()).item()
    assert top < 1.0 and top == pytest.approx(span / (span + 1e-6), rel=1e-14)


def test_constant_factor_maps_to_zero():
    y = MinMaxNormalizer()(torch.full((4,), 3.0, dtype=DT))
    assert torch.equal(y, torch.zeros(4, dtype=DT))


def test_eps_matters_when_the_range_is_small():
    """Not scale invariant: for a range ≈ ε the top entry is ≈ 1/2, for a wide range ≈ 1."""
    x = torch.tensor([0.0, 1e-6], dtype=DT)
    assert MinMaxNormalizer()(x)[1].item() == pytest.approx(0.5, rel=1e-12)
    assert MinMaxNormalizer()(x * 1e6)[1].item() == pytest.approx(1 / (1 + 1e-6), rel=1e-12)
    assert MinMaxNormalizer(eps=0.0)(x)[1].item() == 1.0


def test_whole_factor_including_bias_entry_and_groups():
    """The extremes are taken over every entry: a (groups, d+1) factor is normalised as one
    vector, and the bias entry (1 for Linear/Conv) takes part."""
    H = torch.tensor([[0.2, 0.4, 1.0], [0.1, 3.0, 1.0]], dtype=DT)
    out = MinMaxNormalizer()(H)
    want = torch.tensor(by_hand(H.reshape(-1).tolist()), dtype=DT).reshape(2, 3)
    torch.testing.assert_close(out, want, rtol=1e-14, atol=0)
    # the per-row normalisation would be different
    assert not torch.allclose(out[0], MinMaxNormalizer()(H[0]))


def test_translation_invariant_and_nearly_scale_invariant():
    x = torch.rand(10, dtype=DT) + 0.5
    n = MinMaxNormalizer()
    torch.testing.assert_close(n(x + 7.0), n(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(n(x * 1e3), n(x), rtol=2e-6, atol=0)  # ε/range ≈ 1e-6


def test_map_infinities():
    x = torch.tensor([0.5, math.inf, -math.inf, 0.25], dtype=DT)
    y = MinMaxNormalizer(map_infinities=True)(x)
    torch.testing.assert_close(y, torch.tensor(by_hand([0.5, 1.0, 0.0, 0.25]), dtype=DT))
    plain = MinMaxNormalizer()(x)
    assert not torch.isfinite(plain).all()


@pytest.mark.parametrize("eps", [-1.0, math.inf, math.nan])
def test_invalid_eps(eps):
    with pytest.raises(ValueError):
        MinMaxNormalizer(eps=eps)


def test_does_not_modify_input():
    x = torch.tensor([3.0, 1.0, 2.0], dtype=DT)
    before = x.clone()
    MinMaxNormalizer()(x)
    assert torch.equal(x, before)
