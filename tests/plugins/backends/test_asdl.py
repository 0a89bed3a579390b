"""The ASDL backend: ASDL's Fisher maker replays the batch; statistics equal the native ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("asdl")

from curvlab import CurvatureOptimizer  # noqa: E402
from curvlab.experiments.check_curvature import backend_statistics, native_statistics  # noqa: E402
from curvlab.plugins.backends import UnsupportedLayerError  # noqa: E402

TOL = 1e-8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def both(model: nn.Module, x, y, fisher_type: str = "empirical", seed: int = 0):
    """Native and ASDL mean (H, S) per layer for one batch."""
    opt = CurvatureOptimizer(model, lr=1e-2, warn_on_fallback=False)
    native = native_statistics(opt.layers, model, x, y, fisher_type, seed)
    opt.backend.detach()
    reference, _ = backend_statistics(
        "asdl", opt.layers, opt.estimator, model, x, y, fisher_type, seed
    )
    return opt, native, reference


class Tokens(nn.Module):
    """Embedding → Linear on (batch, tokens, dim) → mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(5, 4)

    def forward(self, i):  # noqa: ANN001
        return self.lin(torch.tanh(self.emb(i))).mean(1)


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 4, 2, stride=(2, 1), bias=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 5, 4),
    )


@pytest.mark.parametrize("fisher_type", ["empirical", "exact", "mc"])
def test_linear_conv_embedding_factors_equal_native(fisher_type):
    """Kronecker-factor diagonals of Linear (2-D and 3-D input), Conv2d (stride, padding,
    groups, no bias) and Embedding (no token repeated within a sample) after conventions."""
    torch.manual_seed(0)
    cases = [
        (conv().double(), torch.randn(6, 3, 8, 8, dtype=torch.float64)),
        # ASDL builds the Embedding's A from float32 counts scaled by 1/N: N = 8 keeps it exact
        (Tokens().double(), torch.stack([torch.randperm(11)[:3] for _ in range(8)])),
    ]
    for model, x in cases:
        y = torch.randint(0, 4, (x.shape[0],))
        _, native, reference = both(model, x, y, fisher_type, seed=5)
        assert native.keys() == reference.keys() and len(native) >= 2
        for name in native:
            for a, b in zip(native[name], reference[name], strict=True):
                assert rel(a, b) < TOL, (fisher_type, name)


def sign_pattern(n: int, d: int, scale: float = 1.7) -> torch.Tensor:
    """±scale with half of each column positive: mean 0 and |x̂| the same on every row."""
    cols = [
        torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)])[torch.randperm(n)]
        for _ in range(d)
    ]
    return scale * torch.stack(cols, 1).double()


@pytest.mark.parametrize(
    "norm, shape",
    [(nn.BatchNorm1d(6), (8, 6)), (nn.LayerNorm(6), (8, 6)), (nn.BatchNorm2d(6), (8, 6, 1, 1))],
    ids=["bn1d", "ln", "bn2d"],
)
def test_norm_layer_diagonal_equals_native_where_exact(norm, shape):
    """ASDL's diagonal of a norm layer's weight is per parameter, Σ_rows (x̂ s)²; curvlab's is the
    Kronecker-factored mean(x̂²)·mean(s²). They coincide when |x̂| is the same on every row of a
    feature (±a inputs): then F_weight = H·S and F_bias = S agree to round-off."""
    torch.manual_seed(1)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = sign_pattern(shape[0], 6).reshape(shape)
    if isinstance(norm, nn.LayerNorm):
        x = sign_pattern(6, shape[0]).T.contiguous()  # the pattern along the normalised dim
    y = torch.randint(0, 3, (shape[0],))
    opt, native, reference = both(model, x, y)
    record = opt.layers[0]
    (H, S), (H_ref, S_ref) = native[record.name], reference[record.name]
    F_nat = record.adapter.curvature(record.module, H, S)
    F_ref = record.adapter.curvature(record.module, H_ref, S_ref)
    assert rel(F_nat["weight"], F_ref["weight"]) < TOL
    assert rel(F_nat["bias"], F_ref["bias"]) < TOL
    for name in list(native)[1:]:  # the Linear layers after it
        for a, b in zip(native[name], reference[name], strict=True):
            assert rel(a, b) < TOL


def test_norm_layer_diagonals_differ_in_general_but_bias_agrees():
    """On generic data the two weight diagonals differ (documented), the bias diagonal (mean s²)
    of LayerNorm and BatchNorm1d is the same quantity; on ONE row LayerNorm's agree exactly."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    _, native, reference = both(model, x, y)
    (H, S), (H_ref, S_ref) = native["1"], reference["1"]
    assert rel(S, S_ref) < TOL
    assert rel(H * S, H_ref * S_ref) > 1e-3
    _, native, reference = both(model, x[:1], y[:1])
    (H, S), (H_ref, S_ref) = native["1"], reference["1"]
    assert rel(S, S_ref) < TOL and rel(H * S, H_ref * S_ref) < TOL


def test_training_matches_native_and_replay_is_side_effect_free():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.Dropout(0.3),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, affine=False),
        nn.Tanh(),
        nn.Linear(8, 4),
    ).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    params = {}
    for backend in ("native", "asdl"):
        net = copy.deepcopy(model)
        torch.manual_seed(4)  # the same dropout masks in both runs
        opt = CurvatureOptimizer(net, backend=backend, lr=1e-2)
        for step in range(10):
            idx = slice(4 * step, 4 * step + 9)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            if backend == "asdl" and step == 0:  # the replay must not touch grads, RNG, buffers
                grads = [p.grad.clone() for p in net.parameters()]
                rng = torch.get_rng_state()
                running = net[4].running_mean.clone()
                opt.backend.collect()
                assert all(
                    torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True)
                )
                assert torch.equal(rng, torch.get_rng_state())
                assert torch.equal(running, net[4].running_mean)
                assert all(r.has_statistics for r in opt.layers)
            opt.step()
        opt.backend.detach()
        params[backend] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(params["native"], params["asdl"], strict=True):
        assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    "model, match",
    [
        (
            nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 3)),
            r"'1' \(GroupNorm\).*BatchNorm1d/2d, LayerNorm",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2, 3)),
            r"'0' \(Conv2d\).*dilation",
        ),
        (
            nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 3)),
            r"'1' \(LayerNorm\).*both affine",
        ),
    ],
    ids=["groupnorm", "dilation", "ln-no-bias"],
)
def test_unsupported_layer_raises(model, match):
    with pytest.raises(UnsupportedLayerError, match=r"^asdl backend: cannot handle layer " + match):
        CurvatureOptimizer(model, backend="asdl")


def test_embedding_needs_token_dimension():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    opt = CurvatureOptimizer(model, backend="asdl")
    with pytest.raises(
        UnsupportedLayerError, match=r"'0' \(Embedding\).*\(batch, tokens\) indices"
    ):
        model(torch.randint(0, 10, (5,)))
    opt.backend.detach()


def test_full_estimator_matches_native():
    """Full Kronecker factors (with the bias row/column and per-group blocks) from ASDL's kron."""
    from curvlab import registry

    if "full" not in registry.registered("estimators"):
        pytest.skip("no full estimator")
    torch.manual_seed(6)
    model = conv().double()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    kwargs = dict(estimator="full", update_rule="kfac", normalizer="identity")
    stats = {}
    for backend in ("native", "asdl"):
        opt = CurvatureOptimizer(model, backend=backend, lr=1e-2, **kwargs)
        F.cross_entropy(model(x), y).backward()
        opt.backend.collect()
        stats[backend] = {r.name: [s.total / s.count for s in r.take()] for r in opt.layers}
        opt.backend.detach()
        model.zero_grad()
    assert stats["native"].keys() == stats["asdl"].keys()
    for name, pair in stats["native"].items():
        for a, b in zip(pair, stats["asdl"][name], strict=True):
            assert a.dim() == 3 and rel(a, b) < TOL, name


class Reused(nn.Module):
    """One Linear applied twice (ASDL sums both calls, as the native records do)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # noqa: ANN001
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


def test_module_used_twice_per_forward():
    torch.manual_seed(7)
    model = Reused().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, native, reference = both(model, x, y)
    for name in native:
        for a, b in zip(native[name], reference[name], strict=True):
            assert rel(a, b) < TOL, name
