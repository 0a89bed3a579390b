"""The solvers of banded/full layers (curvlab/kronecker*.py) against dense Kronecker matrices
and against each other (float64):

* every solver × damping mode × power equals ``F^{-p} vec(V)`` of the dense damped Kronecker
  matrix built from the normalised factors (for ``block``: of their diagonal blocks);
* K-FAC's inverse solve (factored damping) gives the same trajectory as the eigenbasis solve
  it replaces, to 1e-10, with layers of equal shapes solved as one batch, a layer whose factors
  arrive late, curvature every 2 and inverses every 3 steps, and the KL clip;
* the block solve of banded(b ≥ d − 1) equals the block solve of full factors;
* batched (packed) state resumes bitwise through ``state_dict``; refreshes of unchanged
  factors are skipped; the inverse's float64 refresh is what keeps rank-deficient fp32
  factors accurate.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT
from curvlab.kronecker import Packs, RefreshItem
from curvlab.kronecker_block import BlockEigenSolver, diagonal_blocks
from curvlab.kronecker_eigen import EigenSolver
from curvlab.kronecker_inverse import InverseSolver
from curvlab.plugins.estimators.banded import band_of_rows
from curvlab.structures import band_to_dense, dense_factor

pytestmark = pytest.mark.filterwarnings("ignore::curvlab.optimizer.CurvatureFallbackWarning")


class Net(nn.Module):
    """Two Linear layers of equal shape (one batch), a grouped Conv2d, and a Linear branch
    that only runs once ``late`` is set (its factors arrive between refreshes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.extra = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.late = False

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h))
        if self.late:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


def batches(n, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def kfac(model, *bindings):
    return curvlab.build_optimizer(model, CONFIG_ROOT / "kfac.gin", bindings=list(bindings))


def train(make, data, late_from=None, model=None):
    torch.manual_seed(0)
    model = Net().double() if model is None else model
    opt = make(model)
    for i, (x, y) in enumerate(data):
        model.late = late_from is not None and i >= late_from
        step(model, opt, x, y)
    return model, opt


# -- the dense oracle ------------------------------------------------------------------------
def _minmax(M, eps=1e-6):
    values = torch.linalg.eigvalsh(M)
    lo, hi = values.min(), values.max()  # over all groups
    return (M - lo * torch.eye(M.shape[-1], dtype=M.dtype)) / (hi - lo + eps)


def _block_mask(d, k):
    idx = torch.arange(d)
    return (idx[:, None] // k) == (idx[None, :] // k)


def dense_solve(record, state, V, normalizer, damping, mode, power, block=None):
    """``F^{-p} vec(V)`` per group with F the dense damped Kronecker matrix (row-major vec)."""
    H = dense_factor(record.structure, state["H"])
    S = dense_factor(record.structure, state["S"])
    if block is not None:  # the block solve is exact for the factors' diagonal blocks
        H = H * _block_mask(H.shape[-1], block)
        S = S * _block_mask(S.shape[-1], block)
    # after_root: x ↦ x^p is not Lipschitz at 0, so the spectra are normalised as numbers
    # (min-max maps the smallest eigenvalue to exactly 0; a dense eigh of the normalised
    # matrix rounds it to ±ε, and ε^0.5 is not small)
    spectra = [torch.linalg.eigh(M) for M in (S, H)] if mode == "after_root" else None
    if spectra is not None and normalizer == "minmax":
        for i, (values, vectors) in enumerate(spectra):
            lo, hi = values.min(), values.max()
            spectra[i] = ((values - lo) / (hi - lo + 1e-6), vectors)
    if normalizer == "minmax":
        H, S = _minmax(H), _minmax(S)
    elif normalizer == "trace":  # mean eigenvalue (over all groups) 1
        H = H / (torch.linalg.eigvalsh(H).mean() + 1e-12)
        S = S / (torch.linalg.eigvalsh(S).mean() + 1e-12)
    out = []
    if mode == "factored":
        lh = torch.linalg.eigvalsh(H).mean()
        ls = torch.linalg.eigvalsh(S).mean()
        pi = torch.sqrt(lh / ls)
    for g in range(V.shape[0]):
        Hg, Sg = H[g], S[g]
        eye_h = torch.eye(Hg.shape[-1], dtype=Hg.dtype)
        eye_s = torch.eye(Sg.shape[-1], dtype=Sg.dtype)
        if mode == "factored":
            root = math.sqrt(damping)
            K = torch.kron(Sg + root / pi * eye_s, Hg + pi * root * eye_h)
            mu, Q = torch.linalg.eigh(K)
            denom = mu**power
        elif mode == "after_product":
            mu, Q = torch.linalg.eigh(torch.kron(Sg, Hg))
            denom = (mu + damping) ** power
        else:  # after_root: the eigenpairs of S'⊗H' are the products of the factors'
            (ls, QS), (lh, QH) = ((values[g], vectors[g]) for values, vectors in spectra)
            mu, Q = torch.kron(ls, lh), torch.kron(QS, QH)
            denom = mu.clamp_min(0) ** power + damping
        v = V[g].reshape(-1)
        out.append((Q @ ((Q.T @ v) / denom)).reshape(V[g].shape))
    return torch.stack(out)


CASES = [
    # (estimator, solver, block, normalizer, damping mode, power)
    ("full", "eigen", None, "identity", "factored", 1.0),
    ("full", "inverse", None, "identity", "factored", 1.0),
    ("full", "inverse", None, "trace", "factored", 1.0),
    ("full", "inverse", None, "minmax", "factored", 0.5),
    ("full", "eigen", None, "minmax", "after_product", 1.0),
    ("full", "eigen", None, "minmax", "after_root", 0.5),
    ("full", "block", 5, "minmax", "after_product", 1.0),
    ("banded", "block", 5, "minmax", "after_product", 1.0),
    ("banded", "block", 5, "minmax", "after_root", 0.5),
    ("banded", "block", 64, "minmax", "after_product", 1.0),  # d ≤ k: one block, exact
    ("banded", "block", 5, "identity", "factored", 1.0),
    ("banded", "eigen", None, "minmax", "after_product", 1.0),
    ("banded", "inverse", None, "identity", "factored", 1.0),  # LU inverse of the band
]


@pytest.mark.parametrize("estimator, solver, block, normalizer, mode, power", CASES)
def test_solve_equals_dense_kronecker_oracle(estimator, solver, block, normalizer, mode, power):
    options = dict(solver=solver, per_sample=False)
    if block is not None:
        options["block_size"] = block
    if estimator == "banded":
        options["bandwidth"] = 2
    est = curvlab.registry.create("estimators", estimator, **options)
    damping = curvlab.registry.create("damping", "constant", value=1e-2, mode=mode)
    torch.manual_seed(0)
    model = Net().double()
    opt = curvlab.CurvatureOptimizer(
        model, estimator=est, normalizer=normalizer, damping=damping, gamma=0.0
    )
    for x, y in batches(2, size=40):  # full-rank factors (40 rows, d ≤ 17)
        step(model, opt, x, y)
    assert opt.kronecker_solver.name == solver
    precond = opt._make_preconditioner()
    checked = 0
    for record in opt.layers:
        if record.structure == "diagonal" or record.name not in opt.curvature_state:
            continue
        params = list(record.params.values())
        grads = [torch.randn_like(p) for p in params]
        solved = precond.solve(params, grads, power)
        V = record.adapter.to_matrix(record.module, dict(zip(record.params, grads)))
        expected = dense_solve(
            record, opt.curvature_state[record.name], V, normalizer, 1e-2, mode, power, block
        )
        got = record.adapter.to_matrix(record.module, dict(zip(record.params, solved)))
        # normwise: the oracle's dense eigendecomposition rounds differently entry by entry
        error = float((got - expected).norm() / expected.norm())
        assert error < 1e-10, (record.name, error)
        # and the reported diagonal of F (damping included)
        diag = precond.dense_diagonal(params[0])
        assert diag.shape == params[0].shape and bool((diag > 0).all())
        checked += 1
    assert checked == 4  # conv, a, b, head ("extra" never ran)


def test_inverse_solve_trajectory_equals_eigenbasis_solve():
    """K-FAC with factored damping: the new default (inverses of the damped factors, two
    products) against the eigenbasis solve it replaces (four products), float64."""
    data = batches(10, seed=1)
    common = ("optimizer.curvature_interval = 2", "optimizer.inverse_interval = 3")
    m_inv, o_inv = train(lambda m: kfac(m, *common), data, late_from=4)
    m_eig, o_eig = train(
        lambda m: kfac(m, *common, "estimators.full.solver = 'eigen'"), data, late_from=4
    )
    assert isinstance(o_inv.kronecker_solver, InverseSolver)
    assert isinstance(o_eig.kronecker_solver, EigenSolver)
    # the late layer got its factors at step 4 and its inverses at once (not at step 6)
    assert "H_inv" in o_inv.curvature_state["extra"]
    # a and b (equal shapes) were refreshed, and are solved, as one batch
    a, b = (o_inv.curvature_state[n]["H_inv"] for n in ("a", "b"))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    for (name, p), q in zip(m_inv.named_parameters(), m_eig.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(o_inv.preconditioner(p), o_eig.preconditioner(q), msg=name)
    assert not torch.equal(m_inv.a.weight, Net().double().a.weight)  # it trained


def test_inverse_solve_with_power_equals_eigenbasis_solve():
    """An update rule with power p ≠ 1 (AdaFisher's square-root ablation) and factored damping:
    ``(M + δ)^{-p}`` from the stored inverse."""

    def make(solver):
        def build(model):
            est = curvlab.registry.create("estimators", "full", solver=solver)
            update = curvlab.registry.create("updates", "adafisher", power=0.5)
            damping = curvlab.registry.create("damping", "factored", value=1e-2)
            return curvlab.CurvatureOptimizer(
                model, lr=1e-2, estimator=est, damping=damping, update_rule=update,
                normalizer="identity", inverse_interval=2,
            )  # fmt: skip

        return build

    data = batches(5, seed=2)
    m_inv, _ = train(make("inverse"), data)
    m_eig, _ = train(make("eigen"), data)
    for (name, p), q in zip(m_inv.named_parameters(), m_eig.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_block_solve_of_wide_band_equals_block_solve_of_full_factors():
    """banded(b ≥ d − 1) stores the full factor, so its diagonal blocks, and the block solve,
    are the full estimator's."""
    data = batches(4, seed=3)

    def make(estimator, **kw):
        def build(model):
            est = curvlab.registry.create(
                "estimators", estimator, solver="block", block_size=6, per_sample=False, **kw
            )
            return curvlab.CurvatureOptimizer(model, estimator=est, lr=1e-2)

        return build

    m_band, _ = train(make("banded", bandwidth=1000), data)
    m_full, _ = train(make("full"), data)
    for (name, p), q in zip(m_band.named_parameters(), m_full.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_block_solve_differs_from_the_exact_solve_when_blocks_are_smaller():
    data = batches(3, seed=4)

    def make(solver):
        def build(model):
            est = curvlab.registry.create("estimators", "banded", bandwidth=3, solver=solver)
            return curvlab.CurvatureOptimizer(model, estimator=est, lr=1e-2)

        return build

    m_block, _ = train(lambda m: make("block")(m), data)
    m_exact, _ = train(lambda m: make("eigen")(m), data)
    with torch.no_grad():
        m_small = Net().double()
    assert m_block.a.weight.shape[1] <= 64  # one block: the same as the exact solve
    torch.testing.assert_close(m_block.a.weight, m_exact.a.weight, rtol=1e-10, atol=1e-12)
    del m_small

    def make_small(solver):
        def build(model):
            est = curvlab.registry.create(
                "estimators", "banded", bandwidth=3, solver=solver, block_size=4
            )
            return curvlab.CurvatureOptimizer(model, estimator=est, lr=1e-2)

        return build

    m_block, _ = train(make_small("block"), data)
    m_exact, _ = train(make_small("eigen"), data)
    assert not torch.allclose(m_block.a.weight, m_exact.a.weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("structure", ["banded", "full"])
@pytest.mark.parametrize("d, k", [(10, 4), (8, 4), (3, 4), (7, 1)])
def test_diagonal_blocks_equal_the_masked_dense_factor(structure, d, k):
    rows = torch.randn(2, 30, d, dtype=torch.float64)
    factor = band_of_rows(rows, 2) if structure == "banded" else rows.transpose(1, 2) @ rows
    dense = band_to_dense(factor) if structure == "banded" else factor
    blocks, tail = diagonal_blocks(structure, factor, k)
    n = (d // k) * k
    assert blocks.shape == (2, d // k, k, k) and tail.shape == (2, d - n, d - n)
    rebuilt = torch.zeros_like(dense)
    for j in range(d // k):
        rebuilt[:, j * k : (j + 1) * k, j * k : (j + 1) * k] = blocks[:, j]
    rebuilt[:, n:, n:] = tail
    torch.testing.assert_close(rebuilt, dense * _block_mask(d, k), rtol=0, atol=0)


# -- state, batching, refresh skipping ----------------------------------------------------------
@pytest.mark.parametrize("late", [False, True], ids=["", "late_layer"])
@pytest.mark.parametrize("config", ["kfac.gin", "banded_adafisher.gin", "eigen"])
def test_state_dict_round_trip_continues_bitwise(config, late):
    """Batched (packed) inverses/eigenbases are saved with the state; a fresh optimizer that
    loads them re-stacks them and continues bitwise (interrupted between two refreshes; with
    ``late``, after the factors of a third layer of a and b's shape arrived at step 3 and were
    refreshed alone)."""
    late_from = 3 if late else None
    bindings = ["optimizer.inverse_interval = 4"]
    if config == "eigen":
        config, bindings = "kfac.gin", [*bindings, "estimators.full.solver = 'eigen'"]

    def make(model):
        return curvlab.build_optimizer(model, CONFIG_ROOT / config, bindings=bindings)

    data = batches(7, seed=5)
    reference, _ = train(make, data, late_from=late_from)

    torch.manual_seed(0)
    model = Net().double()
    opt = make(model)
    for i, (x, y) in enumerate(data[:5]):
        model.late = late and i >= late_from
        step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model = Net().double()
    resumed_model.load_state_dict(saved["model"])
    resumed_model.late = late
    resumed = make(resumed_model)
    resumed.load_state_dict(saved["opt"])
    for x, y in data[5:]:
        step(resumed_model, resumed, x, y)
    for (name, p), q in zip(resumed_model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    key = resumed.kronecker_solver.state_keys[0]
    a, b = (resumed.curvature_state[n][key] for n in ("a", "b"))
    if not isinstance(resumed.kronecker_solver, BlockEigenSolver):  # re-stacked: one batch
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_refresh_of_unchanged_factors_is_skipped():
    """Curvature every 3 steps, inverses every step: a refresh only follows a curvature step
    (the result of the others would be the same)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = kfac(model, "optimizer.curvature_interval = 3", "optimizer.inverse_interval = 1")
    refreshed = []
    original = opt.kronecker_solver.refresh

    def counting(items, *args):
        refreshed.append((opt._step, sorted(it.name for it in items)))
        return original(items, *args)

    opt.kronecker_solver.refresh = counting
    for x, y in batches(7, seed=6):
        step(model, opt, x, y)
    joint = ["a", "b", "conv", "head"]
    assert refreshed == [(0, joint), (3, joint), (6, joint)]


def test_solver_selection_and_errors():
    model = Net().double()
    assert isinstance(kfac(model).kronecker_solver, InverseSolver)
    banded = curvlab.build_optimizer(model, CONFIG_ROOT / "banded_adafisher.gin")
    assert isinstance(banded.kronecker_solver, BlockEigenSolver)
    assert banded.kronecker_solver.block_size == 64
    full_adafisher = curvlab.CurvatureOptimizer(model, estimator="full")
    assert isinstance(full_adafisher.kronecker_solver, EigenSolver)
    with pytest.raises(ValueError, match="solver='inverse' needs factored damping"):
        curvlab.CurvatureOptimizer(
            model, estimator=curvlab.registry.create("estimators", "full", solver="inverse")
        )
    with pytest.raises(ValueError, match="solver.*auto"):
        curvlab.registry.create("estimators", "banded", solver="cholesky")
    with pytest.raises(ValueError, match="block_size"):
        curvlab.registry.create("estimators", "banded", block_size=0)


def test_fp32_factors_are_inverted_in_float64_only_where_conditioning_needs_it():
    """A rank-deficient fp32 factor (10 rows, d = 200) with a small damping shift (κ ≈ 1e4):
    inverted in fp32 it loses digits (or its Cholesky fails); the solver sees the conditioning
    and inverts it in float64, accurate to fp32 storage. A well-conditioned factor is inverted
    in fp32 (bitwise the fp32 Cholesky inverse)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 200, generator=g)
    H = (X.T @ X / 10).reshape(1, 200, 200)
    eye = torch.eye(200)

    def fp32_inverse(M):
        L, info = torch.linalg.cholesky_ex(M)
        return torch.cholesky_inverse(L), int(info.max())

    def error(inverse, M):
        exact = torch.linalg.inv(M.double())
        return float((inverse.double() - exact).norm() / exact.norm())

    solver = InverseSolver()
    shift = 1e-4 * float(torch.linalg.matrix_norm(H[0], 2))
    ill = H + shift * eye
    inv32, info = fp32_inverse(ill)
    inverse = solver._inverse(ill, "full", torch.tensor([shift]))
    assert inverse.dtype == torch.float32
    assert error(inverse, ill) < 1e-6
    assert info != 0 or error(inv32, ill) > 100 * error(inverse, ill)

    shift = float(torch.linalg.matrix_norm(H[0], 2))
    well = H + shift * eye
    assert torch.equal(solver._inverse(well, "full", torch.tensor([shift])), fp32_inverse(well)[0])
    assert error(fp32_inverse(well)[0], well) < 1e-6


# -- the step's fast paths ---------------------------------------------------------------------
FAST_PATH_CONFIGS = {
    "kfac": ("kfac.gin", "optimizer.inverse_interval = 2"),
    "kfac_eigen": (
        "kfac.gin",
        "optimizer.inverse_interval = 2",
        "estimators.full.solver = 'eigen'",
    ),
    "banded": ("banded_adafisher.gin", "estimators.banded.block_size = 4"),
}


def _from_config(name):
    config, *bindings = FAST_PATH_CONFIGS[name]
    return lambda m: curvlab.build_optimizer(m, CONFIG_ROOT / config, bindings=bindings)


@pytest.mark.parametrize(
    "name, bindings",
    [
        ("kfac", ()),
        ("kfac", ("estimators.full.solver = 'inverse'", "estimators.full.per_sample = False")),
        (
            "banded",
            (
                "estimators.banded.solver = 'inverse'",
                "optimizer.damping = @damping.factored()",
                "optimizer.normalizer = 'identity'",
            ),
        ),
    ],
    ids=["kfac", "kfac_no_per_sample", "banded_inverse"],
)
def test_no_host_read_in_the_step(name, bindings, monkeypatch):
    """The device path of the step, refreshes of K-FAC's inverses included (Cholesky, or LU
    for a band, and triangular solves), reads no tensor value on the host. Refreshes that
    eigendecompose (solvers eigen and block) do: ``torch.linalg.eigh`` checks convergence on
    the host (docs/math.md)."""
    from tests.test_fast_paths import Block, _data, assert_no_syncing_ops, forbid_host_reads

    torch.manual_seed(0)
    model = Block()
    config, *common = FAST_PATH_CONFIGS[name]
    opt = curvlab.build_optimizer(model, CONFIG_ROOT / config, bindings=[*common, *bindings])
    x, y = _data("block")
    for _ in range(3):  # refreshes at steps 0 and 2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with forbid_host_reads(monkeypatch) as prof:
            opt.step()
        assert_no_syncing_ops(prof)
    assert opt.metrics()["skipped_steps"] == 0


@pytest.mark.parametrize("name", list(FAST_PATH_CONFIGS))
def test_cpu_flag_path_equals_device_path(name, monkeypatch):
    """K-FAC's update reads the finite flag and ν on CPU (and takes Σ d·g as fp32 dots); the
    device path blends and stays in fp64: the same trajectory, a skipped step included."""
    from tests.test_fast_paths import _train_with_nan

    params_cpu, state_cpu = _train_with_nan(_from_config(name), True, monkeypatch)
    params_dev, state_dev = _train_with_nan(_from_config(name), False, monkeypatch)
    for key, value in params_cpu.items():
        torch.testing.assert_close(params_dev[key], value, rtol=1e-12, atol=1e-14)
    for i, s in state_cpu.items():
        for key, value in s.items():
            torch.testing.assert_close(state_dev[i][key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "rows_shape", [(1, 300, 700), (2, 150, 520), (2, 50, 520), (1, 40, 100)]
)
def test_gram_equals_the_full_product_and_is_symmetric(rows_shape):
    from curvlab.plugins.estimators.full import gram

    rows = torch.randn(*rows_shape, dtype=torch.float64)
    A = gram(rows, block=128)
    torch.testing.assert_close(A, rows.transpose(1, 2) @ rows, rtol=1e-13, atol=1e-12)
    R, d = rows_shape[-2:]
    if d >= 2 * 128 and R >= 128:  # the block triangle, mirrored (otherwise: one product)
        assert torch.equal(A, A.transpose(1, 2))


def test_cpu_matmul_of_large_slices_equals_the_batched_product(monkeypatch):
    """curvlab.kronecker.matmul multiplies large CPU slices one mm at a time (faster than a
    batched GEMM there); the result is the batched product's, also for transposed views,
    stacks of stacks and a threshold that sends every product down the loop."""
    import curvlab.kronecker as kronecker

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 17, 9, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 11, 9, generator=g, dtype=torch.float64).transpose(-1, -2)
    monkeypatch.setattr(kronecker, "CPU_SLICE_MACS", 1)
    out = kronecker.matmul(a, b)
    torch.testing.assert_close(out, a @ b, rtol=1e-14, atol=0)
    assert out.shape == (2, 3, 17, 11)
    # unequal batch shapes broadcast through @
    torch.testing.assert_close(kronecker.matmul(a, b[0]), a @ b[0], rtol=0, atol=0)


@pytest.mark.parametrize("per_slice", [False, True])
def test_sandwich_equals_the_padded_products(monkeypatch, per_slice):
    """curvlab.kronecker.sandwich: ``left[k] @ V_k @ right[k]`` with zero-padded factors, cut
    back to each V's shape, equals the product of the factors' top-left blocks, whether the
    matrices are stacked (small) or read in place slice by slice (large, CPU): with and without
    padding, with a group dimension, and for a matrix that is a strided view."""
    import curvlab.kronecker as kronecker

    monkeypatch.setattr(kronecker, "CPU_SLICE_MACS", 1 if per_slice else 1 << 62)
    g = torch.Generator().manual_seed(1)
    for (m, n), (r, c) in (((5, 7), (8, 16)), ((8, 16), (8, 16))):
        left = torch.zeros(3, 2, r, r, dtype=torch.float64)
        right = torch.zeros(3, 2, c, c, dtype=torch.float64)
        left[..., :m, :m] = torch.randn(3, 2, m, m, generator=g, dtype=torch.float64)
        right[..., :n, :n] = torch.randn(3, 2, n, n, generator=g, dtype=torch.float64)
        base = torch.randn(3, 2, n, m, generator=g, dtype=torch.float64)
        matrices = [base[k].transpose(-1, -2) for k in range(3)]  # (2, m, n) strided views
        out = kronecker.sandwich(left, matrices, right)
        for k in range(3):
            expected = left[k, :, :m, :m] @ matrices[k] @ right[k, :, :n, :n]
            assert out[k].shape == (2, m, n)
            torch.testing.assert_close(out[k], expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("per_slice", [False, True])
def test_sandwich_of_column_blocks_equals_that_of_the_joined_matrix(monkeypatch, per_slice):
    """A matrix given as blocks of its columns (weight columns, then a bias column: what
    ``LayerAdapter.matrix_columns`` returns) gives the product of the joined matrix."""
    import curvlab.kronecker as kronecker

    monkeypatch.setattr(kronecker, "CPU_SLICE_MACS", 1 if per_slice else 1 << 62)
    g = torch.Generator().manual_seed(2)
    m, n, r, c = 5, 7, 8, 16
    left = torch.zeros(2, 3, r, r, dtype=torch.float64)
    right = torch.zeros(2, 3, c, c, dtype=torch.float64)
    left[..., :m, :m] = torch.randn(2, 3, m, m, generator=g, dtype=torch.float64)
    right[..., :n, :n] = torch.randn(2, 3, n, n, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 3, m, n - 1, generator=g, dtype=torch.float64)
    biases = torch.randn(2, 3 * m, generator=g, dtype=torch.float64)
    blocks = [[weights[k], biases[k].reshape(3, m, 1)] for k in range(2)]
    out = kronecker.sandwich(left, blocks, right)
    for k in range(2):
        joined = torch.cat(blocks[k], dim=-1)
        expected = left[k, :, :m, :m] @ joined @ right[k, :, :n, :n]
        # blocks in, blocks of the same widths out
        assert [b.shape for b in out[k]] == [(3, m, n - 1), (3, m, 1)]
        torch.testing.assert_close(torch.cat(out[k], -1), expected, rtol=1e-13, atol=1e-13)
        if per_slice:  # a weight's product is a tensor of its own (contiguous, no padding)
            assert out[k][0].is_contiguous()


def test_matrix_columns_join_to_the_matrix():
    """The base adapter's column blocks (weight, bias) join to ``to_matrix``; with groups, a
    missing bias role and for an adapter that overrides ``to_matrix`` (one block)."""
    from curvlab.registry import create

    conv = nn.Conv2d(4, 6, 3, groups=2).double()
    linear = nn.Linear(5, 3).double()
    adapter = create("adapters", "conv")
    tensors = {"weight": torch.randn_like(conv.weight), "bias": torch.randn_like(conv.bias)}
    for given in (tensors, {"weight": tensors["weight"]}):
        columns = adapter.matrix_columns(conv, given)
        assert [c.shape for c in columns] == [(2, 3, 18), (2, 3, 1)]
        joined = torch.cat(columns, dim=-1)
        assert torch.equal(joined, adapter.to_matrix(conv, given))
        back = adapter.from_matrix(conv, joined)
        assert torch.equal(back["weight"], given["weight"])
        again = adapter.from_columns(conv, columns)
        assert all(torch.equal(again[r], back[r]) for r in back)
    lin = create("adapters", "linear")
    t = {"weight": torch.randn_like(linear.weight), "bias": torch.randn_like(linear.bias)}
    assert torch.equal(torch.cat(lin.matrix_columns(linear, t), -1), lin.to_matrix(linear, t))
    mha = nn.MultiheadAttention(4, 2).double()
    block = create("adapters", "multihead_attention").blocks(mha)["q_proj"]
    f64 = torch.float64
    t = {"weight": torch.randn(4, 4, dtype=f64), "bias": torch.randn(4, dtype=f64)}
    (only,) = block.matrix_columns(mha, t)
    assert torch.equal(only, block.to_matrix(mha, t))
    back = block.from_columns(mha, [only])
    assert torch.equal(back["weight"], t["weight"]) and torch.equal(back["bias"], t["bias"])

    class Doubling(type(lin)):  # overrides from_matrix only: from_columns must go through it
        def from_matrix(self, module, matrix):
            return {r: 2 * v for r, v in super().from_matrix(module, matrix).items()}

    doubling = Doubling()
    t = {"weight": torch.randn_like(linear.weight), "bias": torch.randn_like(linear.bias)}
    back = doubling.from_columns(linear, doubling.matrix_columns(linear, t))
    assert torch.equal(back["weight"], 2 * t["weight"]) and torch.equal(back["bias"], 2 * t["bias"])


@pytest.mark.parametrize("read_cpu_flags", [True, False], ids=["host", "device_path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_banded_inverses_of_a_batch_equal_one_at_a_time_with_two_threads(
    monkeypatch, read_cpu_flags, dtype
):
    """torch's batched LU on CPU calls LAPACK's getrf from several threads at once when
    intra-op threads > 1 (pytorch#142815): ``linalg.inv`` of a (3, 300, 300) stack then raised
    ("Pivots given to lu_solve …") or returned wrong inverses (‖M M⁻¹ − I‖ up to 10²), float32
    and float64 alike. Banded layers of equal shape are inverted as one stack, so the solver's
    LU inverses (host and device paths) must equal the inverses of each matrix alone."""
    from curvlab.interfaces import update as update_interface

    monkeypatch.setattr(update_interface, "READ_CPU_FLAGS", read_cpu_flags)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 1, 300, 340, generator=g, dtype=dtype)
    M = X @ X.transpose(-1, -2) / 300 + 0.1 * torch.eye(300, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inverse = InverseSolver._invert(M, "banded")
    finally:
        torch.set_num_threads(threads)
    alone = torch.stack([torch.linalg.inv(m.double()) for m in M.reshape(-1, 300, 300)])
    error = (inverse.double().reshape(-1, 300, 300) - alone).abs().amax() / alone.abs().amax()
    assert float(error) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_batched_cholesky_and_eigh_equal_one_at_a_time_with_two_threads():
    """What the full and eigenbasis solvers batch (Cholesky, its inverse, eigh) is not hit by
    the batched-LU race above: at 2 threads the stack's results equal each matrix's alone,
    bitwise."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 300, 340, generator=g)
    M = X @ X.transpose(-1, -2) / 300 + 0.1 * torch.eye(300)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        L = torch.linalg.cholesky_ex(M)[0]
        results = [L, torch.cholesky_inverse(L), torch.linalg.eigh(M)[0]]
        alone = [
            torch.stack([torch.linalg.cholesky_ex(m)[0] for m in M]),
            torch.stack([torch.cholesky_inverse(l) for l in L]),
            torch.stack([torch.linalg.eigh(m)[0] for m in M]),
        ]
    finally:
        torch.set_num_threads(threads)
    for batched, single in zip(results, alone):
        assert torch.equal(batched, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_cholesky_inverses_are_exactly_symmetric_and_row_major(dtype):
    """The host path returns ``cholesky_inverse(L).mT`` as the row-major inverse, which is the
    inverse itself only if torch's result is exactly symmetric; and a pack that needs no padding
    adopts it without a copy (the state entry is the pack's storage)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 1, 48, 60, generator=g, dtype=dtype)
    M = X @ X.transpose(-1, -2) / 60 + 0.5 * torch.eye(48, dtype=dtype)
    inverse = InverseSolver._invert(M, "full")
    assert inverse.is_contiguous() and torch.equal(inverse, inverse.transpose(-1, -2))
    torch.testing.assert_close(
        inverse.double() @ M.double(),
        torch.eye(48, dtype=torch.float64).expand(2, 1, 48, 48),
        rtol=0,
        atol=1e-4 if dtype == torch.float32 else 1e-12,
    )
    packs = Packs(("H_inv",))
    items = [RefreshItem(f"l{i}", "full", {}) for i in range(2)]
    packs.adopt(items, {"H_inv": inverse})
    assert items[0].state["H_inv"].data_ptr() == inverse.data_ptr()
    assert torch.equal(items[1].state["H_inv"], inverse[1])


@pytest.mark.parametrize("read_cpu_flags", [True, False])
@pytest.mark.parametrize("structure", ["full", "banded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_inverted_at_the_padded_size_give_the_inverse_zero_padded(
    monkeypatch, dtype, structure, read_cpu_flags
):
    """A refresh factorises ``blockdiag(M, I)`` at the packs' size (37 → 48): its top-left block
    is M⁻¹ (as inverting M alone, float64), everything else exactly zero (the packs' products
    rely on it); every path: fp32 Cholesky, float64, LU of a band, the device's triangular
    solves (``READ_CPU_FLAGS`` off)."""
    from curvlab.interfaces import update as update_interface
    from curvlab.kronecker_inverse import padded_system

    monkeypatch.setattr(update_interface, "READ_CPU_FLAGS", read_cpu_flags)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 1, 37, 50, generator=g, dtype=dtype)
    M = X @ X.transpose(-1, -2) / 50 + 0.5 * torch.eye(37, dtype=dtype)
    padded = padded_system(list(M.unbind()))
    assert padded.shape == (2, 1, 48, 48) and torch.equal(padded[..., :37, :37], M)
    inverse = InverseSolver()._inverse(padded, structure, torch.tensor([0.5, 0.5]), 37)
    assert inverse.shape == (2, 1, 48, 48) and inverse.dtype == dtype
    want = torch.linalg.inv(M.double())
    error = (inverse[..., :37, :37].double() - want).abs().amax() / want.abs().amax()
    assert float(error) < (1e-6 if dtype == torch.float32 else 1e-13)
    margins = inverse.clone()
    margins[..., :37, :37] = 0
    assert torch.equal(margins, torch.zeros_like(margins))


def test_refresh_in_chunks_equals_the_whole_batch(monkeypatch):
    """K-FAC's refresh inverts a batch of equal shapes in chunks of at most
    REFRESH_CHUNK_BYTES (memory); chunks of one layer give the inverses, shifts and diagonals
    of the whole batch at once, and the same steps after (float64: LAPACK's batched and single
    calls round small matrices differently, so not bitwise)."""
    from curvlab import kronecker_inverse

    def run(chunk_bytes):
        monkeypatch.setattr(kronecker_inverse, "REFRESH_CHUNK_BYTES", chunk_bytes)
        torch.manual_seed(0)
        layers = [nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3)).double()
        opt = curvlab.build_optimizer(
            model, CONFIG_ROOT / "kfac.gin", bindings=["optimizer.inverse_interval = 2"]
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(16, 40, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert len(opt.kronecker_solver.packs._packs) == 2  # the three 40→40 layers share one
        return model, opt

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole_model, whole = run(1 << 40)
        chunked_model, chunked = run(1)
    finally:
        torch.set_num_threads(threads)
    for name, state in whole.curvature_state.items():
        for key in ("H_inv", "S_inv", "H_shift", "S_shift", "H_diag", "S_diag"):
            want, got = state[key], chunked.curvature_state[name][key]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=f"{name} {key}")
    for a, b in zip(whole_model.parameters(), chunked_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
