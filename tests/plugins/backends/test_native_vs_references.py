"""Native diagonal factors vs BackPACK, ASDL and curvlinops (float64, after conventions)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlab import CurvatureOptimizer
from curvlab.experiments.check_curvature import (
    FISHER_TYPES,
    available_backends,
    compare,
    format_table,
    native_statistics,
)

TOL = 1e-8


def grouped_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 4, 2, stride=(2, 1), padding=(1, 0), bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 5, 5),
    )


def plain_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 8),
        nn.ReLU(),
        nn.Linear(8, 5),
    )


class TokenNet(nn.Module):
    """Embedding (no token repeated within a sample) → LayerNorm → Linear on 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 5)

    def forward(self, i):  # noqa: ANN001
        return self.out(self.norm(self.emb(i))).mean(1)


def run(model: nn.Module, x: torch.Tensor, fisher_types) -> list:  # noqa: ANN001
    torch.manual_seed(0)
    model = model.double()
    y = torch.randint(0, 5, (x.shape[0],))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = CurvatureOptimizer(model, lr=1e-2)
        rows = compare(model, opt.layers, opt.estimator, x, y, fisher_types, tol=TOL, seed=7)
    opt.backend.detach()
    print(format_table(rows, TOL))
    return rows


def statuses(rows, backend, fisher_type=None):  # noqa: ANN001, ANN201
    return {
        r.layer: r.status
        for r in rows
        if r.backend == backend and (fisher_type is None or r.fisher_type == fisher_type)
    }


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs backpack and asdl")
def test_grouped_cnn_empirical_both_references():
    rows = run(grouped_cnn(), torch.randn(8, 3, 8, 8, dtype=torch.float64), ("empirical",))
    for backend in ("backpack", "asdl"):
        assert statuses(rows, backend) == {"0": "PASS", "2": "PASS", "4": "PASS", "6": "PASS"}


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs backpack and asdl")
def test_plain_cnn_every_fisher_type_both_references():
    rows = run(plain_cnn(), torch.randn(6, 3, 8, 8, dtype=torch.float64), FISHER_TYPES)
    for backend in ("backpack", "asdl"):
        for fisher_type in FISHER_TYPES:
            got = statuses(rows, backend, fisher_type)
            assert got == {k: "PASS" for k in ("0", "2", "5", "7")}, (backend, fisher_type)
    assert max(e for r in rows for e in r.errors.values() if e is not None) < TOL


@pytest.mark.skipif("asdl" not in available_backends(), reason="needs asdl")
def test_embedding_layernorm_against_asdl():
    x = torch.stack([torch.randperm(13)[:4] for _ in range(8)])
    rows = run(TokenNet(), x, ("empirical", "exact"))
    for fisher_type in ("empirical", "exact"):
        asdl = {r.layer: r for r in rows if r.backend == "asdl" and r.fisher_type == fisher_type}
        assert asdl["emb"].status == asdl["out"].status == "PASS"
        # LayerNorm: S (mean s² per feature) is the same quantity and agrees; ASDL's weight
        # diagonal is per parameter (Σ (x̂ s)²), reported, not judged (test_asdl.py checks it
        # where the two coincide)
        assert asdl["norm"].status == "PASS[S]" and asdl["norm"].errors["S"] < TOL
    backpack = statuses(rows, "backpack")
    assert set(backpack.values()) == {"n/a"}


def test_empirical_conv_against_curvlinops():
    """curvlinops' empirical K-FAC ("expand") as a third, independent oracle: A is curvlab's
    mean over rows, G = N²·L·S for a mean-reduced loss (L = output positions). Ungrouped
    convolutions only: for a grouped one curvlinops 3.0.1 returns one A whose diagonal is not
    the mean of the per-group factors (BackPACK, ASDL and native agree with each other there)."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(1)
    model = plain_cnn().double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    opt = CurvatureOptimizer(model, lr=1e-2)
    native = native_statistics(opt.layers, model, x, y, "empirical")
    opt.backend.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvlinops.KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            list(model.parameters()),
            [(x, y)],
            fisher_type="empirical",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
    n = x.shape[0]
    with torch.no_grad():
        positions = {}
        h = x
        for name, module in model.named_children():
            h = module(h)
            positions[name] = h.shape[-1] * h.shape[-2] if h.dim() == 4 else 1
    for name, (H, S) in native.items():
        A, G = op._input_covariances.get(name), op._gradient_covariances[name]
        if A is not None:
            assert torch.allclose(torch.diagonal(A), H.reshape(-1), rtol=TOL, atol=0)
        assert torch.allclose(torch.diagonal(G) / (n * n * positions[name]), S, rtol=TOL, atol=0)


def conv_family() -> nn.Module:
    """Conv1d → ConvTranspose1d → (reshaped, a Sequential BackPACK can backpropagate through)."""
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 9, 5),
    )


def conv3d_family() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 3, 2, stride=(2, 1, 1), padding=1),
        nn.ReLU(),
        nn.ConvTranspose3d(3, 2, (1, 2, 2), stride=(1, 1, 2)),
        nn.Flatten(),
        nn.Linear(2 * 3 * 6 * 8, 5),
    )


@pytest.mark.skipif("backpack" not in available_backends(), reason="needs backpack")
@pytest.mark.parametrize(
    "make, shape", [(conv_family, (6, 3, 10)), (conv3d_family, (5, 2, 4, 4, 3))], ids=["1d", "3d"]
)
def test_conv_family_every_fisher_type_against_backpack(make, shape):
    """check-curvature's comparison for Conv1d/Conv3d/ConvTranspose1d/3d: every layer PASSes
    against BackPACK for the empirical, exact and MC Fisher; ASDL (no operation for these
    layer types) reports them n/a with the reason and still checks the Linear layer."""
    rows = run(make(), torch.randn(*shape, dtype=torch.float64), FISHER_TYPES)
    layers = {r.layer for r in rows}
    for fisher_type in FISHER_TYPES:
        assert statuses(rows, "backpack", fisher_type) == dict.fromkeys(layers, "PASS")
    assert max(e for r in rows for e in r.errors.values() if e is not None) < TOL
    if "asdl" in available_backends():
        asdl = {r.layer: r for r in rows if r.backend == "asdl" and r.fisher_type == "empirical"}
        linear = max(layers, key=int)
        assert asdl[linear].status == "PASS"
        for name in layers - {linear}:
            assert asdl[name].status == "n/a" and "cover nn.Conv2d only" in asdl[name].note
