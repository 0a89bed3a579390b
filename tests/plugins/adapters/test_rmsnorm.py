"""RMS-type normalisation: nn.RMSNorm in the default adapters, transformers' classes and user
classes through ``curvlab.register_layer`` (factors equal nn.RMSNorm's, float64), and the
mapping rules (precedence, activation by adapter name, errors)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.layers import registered_layers
from curvlab.plugins.adapters.hf_rmsnorm import HF_RMS_NORMS
from curvlab.plugins.adapters.normalization import RMSNormAdapter
from curvlab.registry import UnknownPluginError

DT = torch.float64
D = 6


@pytest.fixture
def clean_mappings():
    """register_layer is global: restore the mappings after a test that adds some."""
    from curvlab import layers, registry

    registry.load_builtin_plugins()  # the built-in mappings are registered by the plugins
    saved = dict(layers._MAPPINGS)
    yield
    layers._MAPPINGS.clear()
    layers._MAPPINGS.update(saved)


class UserRMSNorm(nn.Module):
    """A user class in the style of transformers' LlamaRMSNorm (fp32 compute, cast back)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32) if dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.gain * h.to(dtype)


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(4, D)
        self.norm = norm
        self.out = nn.Linear(D, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def twin(norm: nn.Module, weight_of=lambda m: m.weight) -> tuple[Net, Net]:
    """(net with ``norm``, the same net with nn.RMSNorm of the same weight and ε)."""
    torch.manual_seed(0)
    a = Net(norm).double()
    with torch.no_grad():
        weight_of(a.norm).copy_(torch.linspace(0.5, 1.5, D))
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    b = Net(nn.RMSNorm(D, eps=eps)).double()
    b.inp.load_state_dict(a.inp.state_dict())
    b.out.load_state_dict(a.out.state_dict())
    with torch.no_grad():
        b.norm.weight.copy_(weight_of(a.norm))
    return a, b


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 2, 4, generator=g, dtype=DT), torch.randint(0, 3, (5, 2), generator=g))
        for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()


def assert_same_norm_curvature(a: Net, opt_a, b: Net, opt_b, weight_of=lambda m: m.weight):
    for key in ("H", "S"):
        torch.testing.assert_close(
            opt_a.curvature_state["norm"][key],
            opt_b.curvature_state["norm"][key],
            rtol=1e-12,
            atol=1e-15,
        )
    torch.testing.assert_close(
        opt_a.preconditioner(weight_of(a.norm)),
        opt_b.preconditioner(b.norm.weight),
        rtol=1e-12,
        atol=1e-15,
    )


def hf_class(module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers has no {module}.{name} here")


# -- transformers' classes, mapped automatically ---------------------------------------------------
@pytest.mark.parametrize(
    "module, name",
    [
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ("transformers.models.t5.modeling_t5", "T5LayerNorm"),
    ],
)
def test_hf_norm_factors_equal_nn_rmsnorm(module, name):
    cls = hf_class(module, name)
    a, b = twin(cls(D, eps=1e-5))
    opt_a, opt_b = curvlab.AdaFisherW(a), curvlab.AdaFisherW(b)
    assert opt_a.coverage().share == 1.0
    adapter_a = opt_a._layer_by_name["norm"].adapter
    adapter_b = opt_b._layer_by_name["norm"].adapter
    assert isinstance(adapter_a, RMSNormAdapter) and adapter_a.eps == "variance_epsilon"

    # on the same input and output gradient the factors are the same (float64)
    x = torch.randn(5, 2, D, dtype=DT)
    s = torch.randn(5, 2, D, dtype=DT)
    for adapter, norm in ((adapter_a, a.norm), (adapter_b, b.norm)):
        H = adapter.input_diagonal(norm, x, norm(x), DT)
        S = adapter.output_diagonal(norm, s, DT)
        assert (H.count, S.count) == (10, 10)
        curvature = adapter.curvature(norm, H.total / H.count, S.total / S.count)["weight"]
        if adapter is adapter_a:
            want = (H.total, S.total, curvature)
    x_hat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # written out
    torch.testing.assert_close(want[0], x_hat.pow(2).sum((0, 1)), rtol=1e-12, atol=0)
    for got, expected in zip((H.total, S.total, curvature), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)

    # through the hooks while training: the HF class computes in fp32 and casts back, so the
    # two models agree to fp32 rounding
    data = batches()
    train(a, opt_a, data)
    train(b, opt_b, data)
    for key in ("H", "S"):
        torch.testing.assert_close(
            opt_a.curvature_state["norm"][key],
            opt_b.curvature_state["norm"][key],
            rtol=1e-6,
            atol=1e-12,
        )


def test_gemma_one_plus_weight_has_the_same_fisher():
    """Gemma computes (1 + w) ⊙ x̂: ∂y/∂w = x̂ as for nn.RMSNorm with weight 1 + w, so with one
    row the curvature is the squared gradient of w."""
    cls = hf_class("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm")
    norm = cls(D, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, D))
    adapter = curvlab.AdaFisherW(Net(norm).double())._layer_by_name["norm"].adapter
    x = torch.randn(1, D, dtype=DT)
    out = norm(x)
    s = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, [norm.weight], s)
    H = adapter.input_diagonal(norm, x, out, DT)
    S = adapter.output_diagonal(norm, s, DT)
    curvature = adapter.curvature(norm, H.total, S.total)["weight"]
    torch.testing.assert_close(curvature, grad**2, rtol=1e-6, atol=0)  # Gemma computes in fp32
    x_hat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(curvature, (x_hat * s)[0] ** 2, rtol=1e-12, atol=0)

    a, b = twin(cls(D, eps=1e-5))
    with torch.no_grad():
        b.norm.weight.add_(1.0)  # nn.RMSNorm's weight is Gemma's 1 + w
    opt_a, opt_b = curvlab.AdaFisherW(a), curvlab.AdaFisherW(b)
    data = batches()
    train(a, opt_a, data)
    train(b, opt_b, data)
    for key in ("H", "S"):
        torch.testing.assert_close(
            opt_a.curvature_state["norm"][key],
            opt_b.curvature_state["norm"][key],
            rtol=1e-6,
            atol=1e-12,
        )


def test_every_listed_hf_class_computes_what_the_mapping_assumes():
    """Each HF_RMS_NORMS class the installed transformers has: y = w ⊙ x / sqrt(mean x² + ε)
    (Gemma: (1 + w)), with ε read from the listed attribute; a mapping exists for it."""
    mappings = registered_layers()
    checked = 0
    for module, name, eps_attr in HF_RMS_NORMS:
        assert mappings[f"{module}.{name}"].options == {"eps": eps_attr}
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        norm = cls(D, eps=1e-3).double()
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 0.5, D))
        assert getattr(norm, eps_attr) == 1e-3
        x = torch.randn(3, 4, D, dtype=DT)
        scale = norm.weight + 1.0 if name.startswith("Gemma") else norm.weight
        want = scale * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)
        # (most compute in fp32 and cast back)
        torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6, msg=name)
        adapter = mappings[f"{module}.{name}"].adapter
        assert adapter.epsilon(norm, DT) == 1e-3
        assert adapter.parameters(norm) == {"weight": norm.weight}
        checked += 1
    assert checked >= 10  # the installed transformers has most of them


# -- register_layer for a user class ---------------------------------------------------------------
def test_register_layer_user_class(clean_mappings):
    a, b = twin(UserRMSNorm(D, eps=1e-5), weight_of=lambda m: m.gain)
    with pytest.warns(curvlab.CurvatureFallbackWarning, match="no adapter for UserRMSNorm"):
        curvlab.AdaFisherW(a)
    curvlab.register_layer(UserRMSNorm, "rmsnorm", eps="variance_epsilon", weight="gain")
    opt_a, opt_b = curvlab.AdaFisherW(a), curvlab.AdaFisherW(b)
    assert opt_a.fallback_parameters() == []
    data = batches()
    train(a, opt_a, data)
    train(b, opt_b, data)
    assert_same_norm_curvature(a, opt_a, b, opt_b, weight_of=lambda m: m.gain)


def test_mapping_takes_precedence_over_isinstance(clean_mappings):
    class RMSLayerNorm(nn.LayerNorm):
        """A LayerNorm subclass whose forward is RMS normalisation."""

        def forward(self, x):
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    model = Net(RMSLayerNorm(D, bias=False)).double()
    opt = curvlab.AdaFisherW(model)
    assert type(opt._layer_by_name["norm"].adapter).__name__ == "LayerNormAdapter"
    curvlab.register_layer(RMSLayerNorm, "rmsnorm")
    opt = curvlab.AdaFisherW(model)
    assert type(opt._layer_by_name["norm"].adapter) is RMSNormAdapter
    # a subclass of a mapped class uses the mapping too
    sub = type("Sub", (RMSLayerNorm,), {})
    opt = curvlab.AdaFisherW(Net(sub(D, bias=False)).double())
    assert type(opt._layer_by_name["norm"].adapter) is RMSNormAdapter


def test_mapping_applies_only_with_its_adapter_among_the_optimizers():
    """no_norm_fisher drops 'rmsnorm' and the official variant has its own four layer types:
    a mapped class then falls back, and the reason says why."""
    cls = hf_class("transformers.models.llama.modeling_llama", "LlamaRMSNorm")
    model = Net(cls(D)).double()
    for opt_of in (
        lambda m: curvlab.AdaFisher(m, variant="official"),
        lambda m: curvlab.build_optimizer(m, "configs/ablations/no_norm_fisher.gin"),
    ):
        with pytest.warns(curvlab.CurvatureFallbackWarning, match="register_layer"):
            opt = opt_of(model)
        (entry,) = opt.fallback_parameters()
        assert entry.name == "norm.weight"
        assert entry.reason == (
            "no adapter for LlamaRMSNorm among this optimizer's adapters (it is mapped to "
            "'rmsnorm' by register_layer)"
        )


def test_mlp_with_rmsnorm_is_fully_covered():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.RMSNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3)
    )
    opt = curvlab.AdaFisherW(model)
    coverage = opt.coverage()
    assert coverage.share == 1.0 and coverage.fallback == ()
    assert coverage.by_adapter() == {"linear": 3, "rmsnorm": 2}
    # 40 + 8 + 72 + 8 + 27 trainable elements, each counted once
    assert coverage.covered_elements == coverage.total_elements == 155


def test_rmsnorm_default_eps_follows_the_input_dtype():
    """nn.RMSNorm(eps=None) uses finfo(input dtype).eps; the statistics are in fp32 anyway."""
    norm = nn.RMSNorm(D).to(torch.bfloat16)
    adapter = RMSNormAdapter()
    x = torch.randn(4, D).to(torch.bfloat16)
    assert adapter.epsilon(norm, x.dtype) == torch.finfo(torch.bfloat16).eps
    H = adapter.input_diagonal(norm, x, norm(x), torch.float32)
    xf = x.float()
    want = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.bfloat16).eps)
    torch.testing.assert_close(H.total, want.pow(2).sum(0), rtol=1e-6, atol=1e-6)


# -- errors ---------------------------------------------------------------------------------------
def test_register_layer_errors(clean_mappings):
    with pytest.raises(UnknownPluginError, match="'rms_norm'.*registered adapters: .*rmsnorm"):
        curvlab.register_layer(UserRMSNorm, "rms_norm")
    with pytest.raises(
        ValueError, match="bad options \\['epsilon'\\].*options of 'rmsnorm': eps, weight, bias"
    ):
        curvlab.register_layer(UserRMSNorm, "rmsnorm", epsilon="variance_epsilon")
    with pytest.raises(ValueError, match="options of 'linear': none"):
        curvlab.register_layer(UserRMSNorm, "linear", eps=1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        curvlab.register_layer(UserRMSNorm, "rmsnorm", eps=-1.0)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        curvlab.register_layer(42, "rmsnorm")
    with pytest.raises(ValueError, match="qualified class name"):
        curvlab.register_layer("UserRMSNorm", "rmsnorm")
    assert not any("UserRMSNorm" in key for key in registered_layers())

    # options that do not fit the module fail at construction, naming the layer
    curvlab.register_layer(UserRMSNorm, "rmsnorm")  # default eps="eps": UserRMSNorm has none
    with pytest.raises(ValueError, match="layer 'norm' \\(UserRMSNorm\\): .*no attribute 'weight'"):
        curvlab.AdaFisherW(Net(UserRMSNorm(D)))
    curvlab.register_layer(UserRMSNorm, "rmsnorm", weight="gain")
    with pytest.raises(ValueError, match="no attribute 'eps' \\(option eps='eps'"):
        curvlab.AdaFisherW(Net(UserRMSNorm(D)))
    curvlab.unregister_layer(UserRMSNorm)
    with pytest.raises(KeyError, match="no mapping"):
        curvlab.unregister_layer(UserRMSNorm)
