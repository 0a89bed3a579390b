"""symmetric_eigh: eigendecompositions of curvature factors that survive fp32 LAPACK failures.

The stored matrix is the 64 × 64 diagonal block of banded AdaFisher's H (Linear layer of the
MNIST-1D CNN, seed 1, lr 3e-3, step 404) for which the CPU wheel's fp32 ``torch.linalg.eigh``
returned two NaN eigenvalues without an error; the NaN eigenvectors made that layer's update
NaN mid-training. Whether a given LAPACK build fails on it varies, so the faults are also
injected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT
from curvlab.interfaces import update as update_interface
from curvlab.kronecker import symmetric_eigh

BLOCK = Path(__file__).parent / "data" / "eigh_fp32_nan_block.npy"
plain_eigh = torch.linalg.eigh


def spd(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, 2 * d, generator=g)
    return a @ a.mT / (2 * d)


def inject(monkeypatch, fail):
    """torch.linalg.eigh whose fp32 calls are corrupted by ``fail(values, vectors)`` (or raise
    when it returns "raise"); float64 calls run unchanged."""

    def eigh(M, *args, **kwargs):
        values, vectors = plain_eigh(M, *args, **kwargs)
        if M.dtype == torch.float32:
            if fail(values, vectors) == "raise":
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", eigh)


def test_the_recorded_block_decomposes_like_float64():
    M = torch.from_numpy(np.load(BLOCK)).unsqueeze(0)
    assert M.dtype == torch.float32 and torch.equal(M, M.mT)
    values, vectors = symmetric_eigh(M)
    assert values.dtype == vectors.dtype == torch.float32
    assert values.isfinite().all() and vectors.isfinite().all()
    exact = torch.linalg.eigvalsh(M.double())
    assert torch.allclose(values.double(), exact, atol=1e-4 * exact.abs().max())
    rebuilt = (vectors * values.unsqueeze(-2)) @ vectors.mT
    assert (rebuilt - M).abs().max() < 1e-4 * M.abs().max()
    assert (vectors.mT @ vectors - torch.eye(64)).abs().max() < 1e-4


def test_only_the_failed_batch_elements_are_redone_in_float64(monkeypatch):
    M = spd(3, 12)
    fp32 = plain_eigh(M)
    fp64 = plain_eigh(M[1].double())

    def nan_in_second(values, vectors):
        values[1, -1] = float("nan")
        vectors[1, 0, 0] = float("nan")

    inject(monkeypatch, nan_in_second)
    values, vectors = symmetric_eigh(M)
    for i in (0, 2):  # untouched: the fp32 result, bitwise
        assert torch.equal(values[i], fp32[0][i]) and torch.equal(vectors[i], fp32[1][i])
    assert torch.equal(values[1], fp64[0].float()) and torch.equal(vectors[1], fp64[1].float())


def test_an_fp32_error_redoes_the_batch_in_float64(monkeypatch):
    M = spd(2, 8, seed=1)
    inject(monkeypatch, lambda values, vectors: "raise")
    values, vectors = symmetric_eigh(M)
    exact = plain_eigh(M.double())
    assert torch.equal(values, exact[0].float()) and torch.equal(vectors, exact[1].float())


def test_a_factor_that_fails_in_float64_too_is_named():
    M = spd(1, 4)
    M[0, 2, 1] = M[0, 1, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="failed in torch.float32 and in float64"):
        symmetric_eigh(M)


def test_on_a_device_the_result_is_not_read(monkeypatch):
    """Device path (emulated by switching off the CPU flag reads): no host read, so a silent
    NaN passes through as it would from torch (docs/reliability.md)."""
    monkeypatch.setattr(update_interface, "READ_CPU_FLAGS", False)
    inject(monkeypatch, lambda values, vectors: values.fill_(float("nan")))
    values, _ = symmetric_eigh(spd(1, 4))
    assert values.isnan().all()


def test_banded_adafisher_step_stays_finite_when_fp32_eigh_returns_nan(monkeypatch):
    """Banded AdaFisher (block solve): the first fp32 eigh of every refresh returns a NaN
    eigenpair; the steps equal those of an undisturbed run to fp32 rounding."""

    def run(disturb: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(70, 20), nn.Tanh(), nn.Linear(20, 5))
        x, y = torch.randn(32, 70), torch.randint(0, 5, (32,))
        opt = curvlab.build_optimizer(model, CONFIG_ROOT / "banded_adafisher.gin")
        with monkeypatch.context() as m:
            if disturb:
                inject(m, lambda values, vectors: (values[0].fill_(float("nan")),
                                                   vectors[0].fill_(float("nan"))))
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    clean, disturbed = run(False), run(True)
    for a, b in zip(clean, disturbed):
        assert b.isfinite().all()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
