"""gin configs: the shipped .gin files build the same optimizers as the Python API, each
ablation changes what it says, bindings override, and mistakes fail loudly."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import CONFIG_ROOT

REPO = CONFIG_ROOT.parent
#: single-component optimizer ablations: the .gin files under configs/ablations/ that modify
#: adafisher.gin (grid files such as paper_components.gin configure ``ablate`` instead)
ABLATIONS = sorted(
    p.name
    for p in (CONFIG_ROOT / "ablations").glob("*.gin")
    if 'include "adafisher.gin"' in p.read_text()
)
LAM = 1e-3


class Net(nn.Sequential):
    """Conv2d + BatchNorm2d + Linear + LayerNorm: layers of both the paper and official sets."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3),
            nn.ReLU(),  # before the BatchNorm: the conv bias has a gradient
            nn.BatchNorm2d(3),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )


def twin_nets() -> tuple[Net, Net]:
    a = Net().double()
    b = Net().double()
    b.load_state_dict(a.state_dict())
    return a, b


def batches(n_batches=5, n=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(n_batches)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def parts(opt) -> str:
    """The repr without the class name: the assembled parts and settings."""
    text = repr(opt)
    return text[text.index("(") :]


# -- the shipped configs equal the Python API ---------------------------------------------------
@pytest.mark.parametrize(
    "config, make",
    [
        ("configs/adafisher.gin", lambda m: curvlab.AdaFisher(m)),
        ("configs/adafisherw.gin", lambda m: curvlab.AdaFisherW(m, weight_decay=5e-4)),
        ("configs/adafisher_official.gin", lambda m: curvlab.AdaFisher(m, variant="official")),
    ],
)
def test_config_builds_the_same_optimizer_as_the_python_api(config, make):
    from_gin, from_python = twin_nets()
    opt_gin = curvlab.build_optimizer(from_gin, config)
    opt_py = make(from_python)
    assert parts(opt_gin) == parts(opt_py)
    assert opt_gin.param_groups[0]["lr"] == opt_py.param_groups[0]["lr"]
    assert opt_gin.param_groups[0]["weight_decay"] == opt_py.param_groups[0]["weight_decay"]
    assert opt_gin.curvature_interval == opt_py.curvature_interval

    data = batches(5)
    train(from_gin, opt_gin, data)
    train(from_python, opt_py, data)
    for (name, p), q in zip(from_gin.named_parameters(), from_python.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert [f.name for f in opt_gin.fallback_parameters()] == [
        f.name for f in opt_py.fallback_parameters()
    ]


def test_config_path_resolves_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = curvlab.build_optimizer(Net(), "configs/adafisher.gin")
    assert opt.param_groups[0]["lr"] == 1e-3
    opt = curvlab.build_optimizer(Net(), str(REPO / "configs" / "adafisherw.gin"))
    assert opt.param_groups[0]["weight_decay"] == 5e-4


# -- ablations ----------------------------------------------------------------------------------
def test_every_ablation_is_tested_here():
    # each one has a test below that checks it changes what it says; add one for a new file
    assert ABLATIONS == [
        "fallback_squared_gradient.gin",
        "no_ema.gin",
        "no_minmax.gin",
        "no_norm_fisher.gin",
        "per_sample_scale.gin",
        "sqrt.gin",
    ]


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_loads_and_trains(name):
    model = Net().double()
    with warnings.catch_warnings():  # no_norm_fisher reports its fallback norm layers
        warnings.simplefilter("ignore", curvlab.CurvatureFallbackWarning)
        opt = curvlab.build_optimizer(model, f"configs/ablations/{name}")
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(3))
    assert opt.metrics() == {"steps": 3, "skipped_steps": 0}
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(b, p)


def test_no_ema_ablation_uses_only_the_current_estimate():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = curvlab.build_optimizer(model, "configs/ablations/no_ema.gin")
    assert opt.gamma == 0.0
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(3)
    ]
    train(model, opt, data)
    x = data[-1][0]
    H_last = torch.cat([(x * x).mean(0), torch.ones(1, dtype=x.dtype)])  # this step's rows only
    torch.testing.assert_close(opt.curvature_state["0"]["H"], H_last, rtol=1e-12, atol=1e-15)


def test_sqrt_ablation_divides_by_the_square_root():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = curvlab.build_optimizer(model, "configs/ablations/sqrt.gin")
    assert opt.update_rule.power == 0.5
    lr = opt.param_groups[0]["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))])
    for b, p in zip(before, model.parameters(), strict=True):
        # first step: bias-corrected momentum m̂ = g
        expected = b - lr * p.grad / opt.preconditioner(p).sqrt()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-14)
        plain = b - lr * p.grad / opt.preconditioner(p)
        assert not torch.allclose(p.detach(), plain)


def test_no_norm_fisher_ablation_makes_norm_layers_fallback():
    model = Net().double()
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="BatchNorm2d"):
        opt = curvlab.build_optimizer(model, "configs/ablations/no_norm_fisher.gin")
    train(model, opt, batches(2))
    reasons = {f.name: f.reason for f in opt.fallback_parameters()}
    assert set(reasons) == {"2.weight", "2.bias", "5.weight", "5.bias"}
    assert "BatchNorm2d" in reasons["2.weight"] and "LayerNorm" in reasons["5.weight"]
    for p in (model[2].weight, model[2].bias, model[5].weight, model[5].bias):
        assert torch.equal(opt.preconditioner(p), torch.full_like(p, 1 + LAM))
    assert not torch.all(opt.preconditioner(model[0].weight) == 1 + LAM)

    # the full config gives the same norm layers real curvature
    paper = curvlab.build_optimizer(Net().double(), "configs/adafisher.gin")
    assert paper.fallback_parameters() == []


def test_per_sample_scale_ablation_scales_output_statistics():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = curvlab.build_optimizer(model, "configs/ablations/per_sample_scale.gin")
    assert opt.estimator.per_sample is True
    base = curvlab.build_optimizer(model, "configs/adafisher.gin")
    assert base.estimator.per_sample is False


def test_no_minmax_ablation_uses_identity_normalizer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = curvlab.build_optimizer(model, "configs/ablations/no_minmax.gin")
    assert type(opt.normalizer).__name__ == "IdentityNormalizer"
    factor = torch.tensor([3.0, -1.0, 7.5], dtype=torch.float64)
    assert torch.equal(opt.normalizer(factor), factor)
    train(model, opt, [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))])
    state = opt.curvature_state["2"]
    F_raw = state["S"][:, None] * state["H"][None, :] + LAM  # no min-max anywhere
    torch.testing.assert_close(
        opt.preconditioner(model[2].weight), F_raw[:, :-1], rtol=1e-12, atol=0
    )
    torch.testing.assert_close(opt.preconditioner(model[2].bias), F_raw[:, -1], rtol=1e-12, atol=0)


# -- bindings -----------------------------------------------------------------------------------
def test_bindings_override_config_values():
    opt = curvlab.build_optimizer(
        Net(),
        "configs/adafisher.gin",
        bindings=[
            "optimizer.lr = 3e-4",
            "optimizer.gamma = 0.5",
            "optimizer.damping = 0.01",
            "optimizer.curvature_interval = 4",
        ],
    )
    assert opt.param_groups[0]["lr"] == 3e-4
    assert opt.gamma == 0.5
    assert opt.damping.value(0) == 0.01
    assert opt.curvature_interval == 4
    # bindings alone (no file) work too; everything else keeps its defaults
    opt = curvlab.build_optimizer(Net(), None, bindings=["optimizer.lr = 0.5"])
    assert opt.param_groups[0]["lr"] == 0.5 and opt.gamma == 0.8


def test_build_optimizer_accepts_param_groups():
    model = Net()
    opt = curvlab.build_optimizer(
        model,
        "configs/adafisher.gin",
        params=[
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": [p for layer in list(model)[1:] for p in layer.parameters()]},
        ],
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-3]


@pytest.mark.parametrize(
    "binding, fragment",
    [
        ("optimizer.not_a_key = 1", "not_a_key"),
        ("no_such_configurable.x = 1", "no_such_configurable"),
    ],
)
def test_unknown_binding_fails(binding, fragment):
    with pytest.raises(ValueError, match=fragment):
        curvlab.build_optimizer(Net(), "configs/adafisher.gin", bindings=[binding])


def test_bad_bound_value_names_the_argument():
    with pytest.raises(ValueError, match="gamma"):
        curvlab.build_optimizer(Net(), "configs/adafisher.gin", bindings=["optimizer.gamma = 1.5"])
    with pytest.raises(KeyError, match="registered estimators"):
        curvlab.build_optimizer(
            Net(), "configs/adafisher.gin", bindings=['optimizer.estimator = "nope"']
        )


def test_missing_config_file_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="adafisher.gin"):
        curvlab.build_optimizer(Net(), "configs/does_not_exist.gin")


def test_config_bindings_do_not_leak_into_python_constructors():
    curvlab.build_optimizer(Net(), "configs/ablations/sqrt.gin")
    opt = curvlab.AdaFisher(Net())
    assert opt.update_rule.power == 1.0


def test_configs_are_plain_files_in_the_repository():
    for name in ("adafisher.gin", "adafisherw.gin", "adafisher_official.gin"):
        assert (CONFIG_ROOT / name).is_file()
    assert (
        Path(curvlab.config.resolve_config("configs/adafisher.gin"))
        == CONFIG_ROOT / "adafisher.gin"
    )


class NetWithScale(Net):
    """Net plus a raw parameter (no adapter): the fallback rule decides its curvature."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_fallback_squared_gradient_ablation_gives_uncovered_parameters_their_own_fisher():
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="squared_gradient"):
        opt = curvlab.build_optimizer(
            NetWithScale().double(), "configs/ablations/fallback_squared_gradient.gin"
        )
    assert type(opt.fallback).__name__ == "SquaredGradientFallback"
    model = opt.model
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    grad = model.scale.grad.clone()
    opt.step()
    v = (1 - opt.gamma) * grad**2  # EMA from zero after one step
    expected = (v - v.min()) / (v.max() - v.min() + 1e-6) + LAM
    torch.testing.assert_close(opt.preconditioner(model.scale), expected, rtol=1e-12, atol=0)
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="identity"):
        base = curvlab.build_optimizer(NetWithScale().double(), "configs/adafisher.gin")
    assert type(base.fallback).__name__ == "IdentityFallback"
