"""The BackPACK backend: same statistics as the native hooks, same training, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("backpack")

from curvlab import CurvatureOptimizer  # noqa: E402
from curvlab.experiments.check_curvature import backend_statistics, native_statistics  # noqa: E402
from curvlab.plugins.backends import UnsupportedLayerError  # noqa: E402

TOL = 1e-8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def captured(model: nn.Module, backend: str, x, y, **kwargs) -> dict:
    """One forward/backward of the mean cross-entropy; each layer's mean (H, S)."""
    opt = CurvatureOptimizer(model, backend=backend, lr=1e-2, warn_on_fallback=False, **kwargs)
    F.cross_entropy(model(x), y).backward()
    opt.backend.collect()
    out = {r.name: tuple(s.total / s.count for s in r.take()) for r in opt.layers}
    opt.backend.detach()
    return out


def assert_same(native: dict, reference: dict, tol: float = TOL) -> None:
    assert native.keys() == reference.keys() and native
    for name in native:
        for a, b in zip(native[name], reference[name], strict=True):
            assert rel(a, b) < tol, name


class Seq(nn.Module):
    """Linear on 3-D input (rows = batch × positions), then pooled to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 4, bias=False)

    def forward(self, x):  # noqa: ANN001
        return self.b(torch.tanh(self.a(x))).mean(1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 4))


def cnn() -> nn.Module:
    """Stride, padding, groups, a bias-free and a dilated convolution."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 6, 2, stride=(2, 1), padding=(0, 1), bias=False, dilation=(1, 2)),
        nn.Flatten(),
        nn.Linear(6 * 3 * 6, 4),
    )


def data(shape: tuple[int, ...], classes: int = 4):
    return torch.randn(*shape, dtype=torch.float64), torch.randint(0, classes, (shape[0],))


@pytest.mark.parametrize(
    "make, shape",
    [(mlp, (16, 6)), (Seq, (5, 3, 5)), (cnn, (6, 3, 8, 8))],
    ids=["mlp", "seq", "cnn"],
)
def test_empirical_factors_equal_native(make, shape):
    model = make().double()
    x, y = data(shape)
    native = captured(model, "native", x, y)
    reference = captured(model, "backpack", x, y)
    assert_same(native, reference)


def test_linear_uses_batchgrad_bias():
    """On 2-D input the g rows of a Linear layer with a bias are BackPACK's per-sample bias
    gradients (BatchGrad), which for a mean loss sum to the gradient."""
    import curvlab.plugins.backends.backpack as bp

    seen = []
    original = bp.BackpackBackend._on_backward

    def spy(self, module, grad_output):  # noqa: ANN001
        gb = module.bias.grad_batch
        assert torch.allclose(gb.sum(0), grad_output.sum(0))
        seen.append(gb.shape)
        return original(self, module, grad_output)

    bp.BackpackBackend._on_backward = spy
    try:
        captured(mlp().double(), "backpack", *data((5, 6)))
    finally:
        bp.BackpackBackend._on_backward = original
    assert seen == [(5, 4), (5, 8), (5, 8)]


def kflr_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.Tanh(),
        nn.Linear(6, 5),
    )


@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
def test_kflr_kfac_factors_equal_native(fisher_type):
    """KFLR (exact) / KFAC (MC, seeded) diagonals after conventions equal what the native hooks
    capture from the loss-Hessian square-root columns / the same sampled labels."""
    model = kflr_model().double()
    x, y = data((7, 2, 8, 8), classes=5)
    opt = CurvatureOptimizer(model, lr=1e-2)
    native = native_statistics(opt.layers, model, x, y, fisher_type, seed=3)
    opt.backend.detach()
    reference, _ = backend_statistics(
        "backpack", opt.layers, opt.estimator, model, x, y, fisher_type, seed=3
    )
    assert_same(native, reference)


@pytest.mark.parametrize("make, shape", [(mlp, (32, 6)), (cnn, (16, 3, 8, 8))], ids=["mlp", "cnn"])
def test_training_matches_native(make, shape):
    torch.manual_seed(1)
    model = make().double()
    x, y = data((10 * shape[0] // 4, *shape[1:]))
    params = {}
    for backend in ("native", "backpack"):
        net = copy.deepcopy(model)
        opt = CurvatureOptimizer(net, backend=backend, lr=1e-2)
        for step in range(10):
            idx = slice((step % 4) * (shape[0] // 4), (step % 4 + 1) * (shape[0] // 4) + 3)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        opt.backend.detach()
        params[backend] = [p.detach().clone() for p in net.parameters()]
        assert not torch.equal(params[backend][0], next(model.parameters()))
    for a, b in zip(params["native"], params["backpack"], strict=True):
        assert (a - b).abs().max().item() < 1e-6


def test_training_with_eval_batchnorm_and_accumulation():
    """An eval-mode BatchNorm is allowed (it is never captured, as natively); two backward
    passes per step average as the native statistics do; curvature every 2nd step."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    ).double()
    model[1].eval()
    x, y = data((24, 1, 4, 4), classes=3)
    params = {}
    for backend in ("native", "backpack"):
        net = copy.deepcopy(model)
        opt = CurvatureOptimizer(
            net, backend=backend, lr=1e-2, curvature_interval=2, warn_on_fallback=False
        )
        for _ in range(6):
            opt.zero_grad()
            for half in (slice(0, 5), slice(5, 12)):
                F.cross_entropy(net(x[half]), y[half]).backward()
            opt.step()
        opt.backend.detach()
        params[backend] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(params["native"], params["backpack"], strict=True):
        assert (a - b).abs().max().item() < 1e-6


def test_context_only_on_curvature_steps_and_detach_is_clean():
    from backpack.context import CTX

    model = mlp()
    opt = CurvatureOptimizer(model, backend="backpack", curvature_interval=2)
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 4, (4,))).backward()
        assert bool(CTX.get_active_exts()) == (step % 2 == 0)
        opt.step()
        assert CTX.get_active_exts() == ()
    opt.backend.detach()
    assert not any(hasattr(m, "_backpack_extend") or hasattr(m, "input0") for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    # the model is usable by a library with old-style backward hooks afterwards
    model[0].register_backward_hook(lambda *a: None).remove()


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.BatchNorm1d(8), r"'1' \(BatchNorm1d\).*BatchNorm only in eval mode"),
        (nn.LayerNorm(8), r"'1' \(LayerNorm\).*does not support LayerNorm"),
        (nn.GroupNorm(2, 8), r"'1' \(GroupNorm\).*exactly nn.Linear and nn.Conv2d"),
    ],
)
def test_unsupported_layer_raises_at_attach(layer, match):
    model = nn.Sequential(nn.Linear(6, 8), layer, nn.Linear(8, 3))
    with pytest.raises(
        UnsupportedLayerError, match=r"^backpack backend: cannot handle layer " + match
    ):
        CurvatureOptimizer(model, backend="backpack")


def test_embedding_and_conv_settings_raise():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(
        UnsupportedLayerError, match=r"layer '0' \(Embedding\).*KFAC/KFLR\) for Embedding"
    ):
        CurvatureOptimizer(model, backend="backpack")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' \(Conv2d\).*padding='same'"):
        CurvatureOptimizer(conv, backend="backpack")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3))
    from curvlab.plugins.backends.backpack import BackpackBackend

    with pytest.raises(UnsupportedLayerError, match=r"KFLR does not support grouped convolutions"):
        CurvatureOptimizer(grouped, backend=BackpackBackend(fisher_type="exact"))


def test_batchnorm_switched_to_train_mode_raises_when_captured():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model[1].eval()
    opt = CurvatureOptimizer(model, backend="backpack", warn_on_fallback=False)
    model.train()
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm1d\).*runs in train mode"):
        model(torch.randn(4, 6))
    opt.backend.detach()


def test_exact_needs_extended_loss():
    from curvlab.plugins.backends.backpack import BackpackBackend

    model = mlp()
    opt = CurvatureOptimizer(model, backend=BackpackBackend(fisher_type="exact"))
    with pytest.raises(RuntimeError, match=r"loss_module\(nn.CrossEntropyLoss\(\)\)"):
        F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 4, (4,))).backward()
    opt.backend.collect()
    loss_fn = opt.backend.loss_module(nn.CrossEntropyLoss())
    opt.zero_grad()
    loss_fn(model(torch.randn(4, 6)), torch.randint(0, 4, (4,))).backward()
    opt.step()
    assert all(r.captured for r in opt.layers)
    opt.backend.detach()


@pytest.mark.parametrize("fisher_type", ["empirical", "exact", "mc"])
def test_full_estimator_matches_native(fisher_type):
    """Full factors: BackPACK's A with the bias row/column added, G (expand for Conv2d)."""
    from curvlab import registry

    if "full" not in registry.registered("estimators"):
        pytest.skip("no full estimator")
    model = (cnn() if fisher_type == "empirical" else kflr_model()).double()
    x, y = data((5, 3, 8, 8) if fisher_type == "empirical" else (5, 2, 8, 8), classes=4)
    opt = CurvatureOptimizer(model, estimator="full", update_rule="kfac", normalizer="identity")
    native = native_statistics(opt.layers, model, x, y, fisher_type, seed=2)
    opt.backend.detach()
    reference, _ = backend_statistics(
        "backpack", opt.layers, opt.estimator, model, x, y, fisher_type, seed=2
    )
    assert all(h.dim() == 3 for h, _ in native.values())
    assert_same(native, reference)


def test_module_used_twice_per_forward_raises():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    opt = CurvatureOptimizer(model, backend="backpack")
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Linear\).*ran twice before a backward"):
        model(torch.randn(3, 4))
    opt.backend.detach()


# -- Conv1d / Conv3d / ConvTranspose1d/2d/3d ---------------------------------------------------
def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=2, dilation=2),
        nn.Sigmoid(),
        nn.Conv1d(4, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 5, 4),
    )


def conv3d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)),
        nn.ReLU(),
        nn.Conv3d(3, 4, (2, 1, 2), dilation=(1, 1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 2 * 2, 4),
    )


def conv_transpose_net() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.ConvTranspose1d(3, 3, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3 * 11, 4),
    )


def conv_transpose_2d_3d_net() -> nn.Module:
    """ConvTranspose2d then (after a reshape BackPACK does not need for the empirical Fisher)
    a grouped ConvTranspose3d."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up2 = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, dilation=1)
            self.up3 = nn.ConvTranspose3d(4, 2, (1, 2, 2), stride=(1, 2, 1), groups=2)
            self.out = nn.Linear(2 * 1 * 14 * 8, 4)

        def forward(self, x):  # noqa: ANN001
            h = torch.relu(self.up2(x))[:, :, None]  # (N, 4, 1, 7, 7)
            return self.out(self.up3(h).flatten(1))

    return Net()


CONV_FAMILY = {
    "conv1d": (conv1d_net, (6, 3, 12)),
    "conv3d": (conv3d_net, (5, 2, 4, 4, 3)),
    "conv_transpose1d": (conv_transpose_net, (5, 2, 5)),
    "conv_transpose2d_3d_grouped": (conv_transpose_2d_3d_net, (4, 3, 4, 4)),
}


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
@pytest.mark.parametrize("name", list(CONV_FAMILY))
def test_conv_family_empirical_factors_equal_native(name, estimator):
    make, shape = CONV_FAMILY[name]
    model = make().double()
    x, y = data(shape)
    kwargs = {} if estimator == "diagonal" else dict(estimator="full", normalizer="identity")
    native = captured(model, "native", x, y, **kwargs)
    reference = captured(model, "backpack", x, y, **kwargs)
    assert_same(native, reference)
    kinds = {type(m) for m in model.modules()}
    assert kinds & {nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d}


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
@pytest.mark.parametrize("name", ["conv1d", "conv3d", "conv_transpose1d"])
def test_conv_family_kflr_kfac_equal_native(name, fisher_type, estimator):
    """KFLR / seeded KFAC through BackPACK's own Conv1d/Conv3d/ConvTranspose1d extensions (with
    the per-position G) vs the native exact / MC drivers."""
    make, shape = CONV_FAMILY[name]
    model = make().double()
    x, y = data(shape, classes=4)
    kwargs = {} if estimator == "diagonal" else dict(estimator="full", normalizer="identity")
    opt = CurvatureOptimizer(model, lr=1e-2, **kwargs)
    native = native_statistics(opt.layers, model, x, y, fisher_type, seed=3)
    opt.backend.detach()
    reference, _ = backend_statistics(
        "backpack", opt.layers, opt.estimator, model, x, y, fisher_type, seed=3
    )
    assert_same(native, reference)


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.Conv1d(2, 2, 3, padding="same"), r"'0' \(Conv1d\).*padding='same'"),
        (nn.Conv3d(2, 2, 1, padding_mode="circular"), r"'0' \(Conv3d\).*padding_mode='circular'"),
        (
            nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1),
            r"'0' \(ConvTranspose2d\).*ignores output_padding \(got \(1, 1\)\)",
        ),
    ],
)
def test_conv_family_settings_raise(layer, match):
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(
        UnsupportedLayerError, match=r"^backpack backend: cannot handle layer " + match
    ):
        CurvatureOptimizer(model, backend="backpack", warn_on_fallback=False)
    from curvlab.plugins.backends.backpack import BackpackBackend

    grouped = nn.Sequential(nn.ConvTranspose1d(2, 2, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(UnsupportedLayerError, match=r"KFAC does not support grouped convolutions"):
        CurvatureOptimizer(grouped, backend=BackpackBackend(fisher_type="mc"))


@pytest.mark.parametrize("name", ["conv1d", "conv_transpose2d_3d_grouped"])
def test_conv_family_training_matches_native(name):
    make, shape = CONV_FAMILY[name]
    torch.manual_seed(1)
    model = make().double()
    x, y = data((3 * shape[0], *shape[1:]))
    params = {}
    for backend in ("native", "backpack"):
        net = copy.deepcopy(model)
        opt = CurvatureOptimizer(net, backend=backend, lr=1e-2)
        for step in range(6):
            idx = slice((step % 3) * shape[0], (step % 3 + 1) * shape[0])
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        opt.backend.detach()
        params[backend] = [p.detach().clone() for p in net.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(params["native"], model.parameters()))
    assert moved > 1e-2
    for a, b in zip(params["native"], params["backpack"], strict=True):
        assert (a - b).abs().max().item() < 1e-9 * moved
