"""banded(0) ≡ diagonal and banded(b ≥ d−1) ≡ full, and the band statistic vs a dense mask."""

import pytest
import torch
from torch import nn

import curvlab
from curvlab.plugins.estimators.banded import BandedEstimator, band_of_rows
from curvlab.structures import band_to_dense


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, groups=1),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    ).double()


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(n)
    ]


def train(estimator, steps_data, **kw):
    torch.manual_seed(0)
    model = conv_net()
    opt = curvlab.CurvatureOptimizer(model, lr=1e-3, estimator=estimator, **kw)
    for x, y in steps_data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_band_of_rows_equals_masked_dense_second_moment():
    rows = torch.randn(2, 50, 7, dtype=torch.float64)
    full = rows.transpose(1, 2) @ rows
    for b in (0, 1, 3, 6, 10):
        dense = band_to_dense(band_of_rows(rows, b))
        i = torch.arange(7)
        mask = (i[:, None] - i[None, :]).abs() <= b
        torch.testing.assert_close(dense, full * mask, rtol=1e-13, atol=1e-13)


def test_banded_zero_is_exactly_the_diagonal_estimator():
    data = batches()
    m_diag, o_diag = train("diagonal", data)
    m_band, o_band = train(BandedEstimator(bandwidth=0), data)
    for p, q in zip(m_diag.parameters(), m_band.parameters()):
        assert torch.equal(p, q)  # bitwise: the same statistics and the same preconditioner
    for p, q in zip(m_diag.parameters(), m_band.parameters()):
        assert torch.equal(o_diag.preconditioner(p), o_band.preconditioner(q))


@pytest.mark.parametrize("normalizer", ["minmax", "identity"])
def test_banded_wide_equals_full(normalizer):
    data = batches()
    m_full, o_full = train(
        curvlab.registry.create("estimators", "full", per_sample=False), data, normalizer=normalizer
    )
    m_band, o_band = train(BandedEstimator(bandwidth=1000), data, normalizer=normalizer)
    for (name, p), q in zip(m_full.named_parameters(), m_band.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    for name, state in o_full.curvature_state.items():
        record = o_full._layer_by_name[name]
        if record.structure == "full":
            torch.testing.assert_close(
                band_to_dense(o_band.curvature_state[name]["H"]), state["H"], rtol=1e-12, atol=1e-14
            )


def test_banded_between_differs_from_both_ends():
    data = batches()
    m_diag, _ = train("diagonal", data)
    m_b1, _ = train(BandedEstimator(bandwidth=1), data)
    m_full, _ = train(curvlab.registry.create("estimators", "full", per_sample=False), data)
    w = [list(m.parameters())[0] for m in (m_diag, m_b1, m_full)]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


def test_negative_bandwidth_is_rejected():
    with pytest.raises(ValueError, match="bandwidth"):
        BandedEstimator(bandwidth=-1)


def test_diagonal_per_sample_scales_output_statistics_by_batch_size_squared():
    from curvlab.plugins.estimators.diagonal import DiagonalEstimator

    data = batches(n=1)
    _, o_raw = train(DiagonalEstimator(), data, gamma=0.0)
    _, o_ps = train(DiagonalEstimator(per_sample=True), data, gamma=0.0)
    n = data[0][0].shape[0]
    for name, state in o_raw.curvature_state.items():
        torch.testing.assert_close(o_ps.curvature_state[name]["H"], state["H"], rtol=0, atol=0)
        torch.testing.assert_close(
            o_ps.curvature_state[name]["S"], state["S"] * n**2, rtol=1e-12, atol=0
        )
