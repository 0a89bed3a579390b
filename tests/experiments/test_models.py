"""Models of curvlab.experiments.models: shapes, sizes, causality, tying, curvature coverage."""

import gin
import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.experiments import models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "expected"), [(models.resnet18, 11_173_962), (models.resnet50, 23_520_842)]
)
def test_resnet_parameter_count_and_shape(factory, expected):
    model = factory(num_classes=10)
    assert n_params(model) == expected  # ≈ 11.2M and ≈ 23.5M, the CIFAR variants
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_is_the_cifar_variant():
    model = models.resnet18(num_classes=100)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.fc.out_features == 100


def test_mobilenet_v3_small_parts_and_shape():
    model = models.mobilenet_v3_small(num_classes=10)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Hardswish in kinds
    assert any(type(m).__name__ == "SqueezeExcitation" for m in model.modules())
    depthwise = [
        m for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    assert len(depthwise) == 11
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def small_gpt(**kwargs):
    defaults = dict(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=4)
    return models.gpt(**{**defaults, **kwargs})


def test_gpt_shape_and_causal_mask():
    model = small_gpt().eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 12, 64)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # earlier positions do not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_rejects_too_long_input():
    with pytest.raises(ValueError, match="context"):
        small_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_tied_head_shares_the_embedding_parameter():
    tied, untied = small_gpt(), small_gpt(tie_weights=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert n_params(untied) - n_params(tied) == 64 * 32


def test_gpt_uses_no_multihead_attention_module():
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in small_gpt().modules())


@pytest.mark.parametrize(
    "factory",
    [small_gpt, lambda: models.mobilenet_v3_small(), lambda: models.resnet18()],
    ids=["gpt", "mobilenet_v3_small", "resnet18"],
)
def test_adafisher_preconditions_every_parameter(factory):
    """Every weight sits in a supported layer, and every layer is captured after a step."""
    model = factory()
    opt = curvlab.AdaFisher(model, lr=1e-3)
    assert opt.fallback_parameters() == []
    if isinstance(model, models.GPT):
        idx = torch.randint(0, 64, (4, 16))
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    else:
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    opt.step()
    assert opt.fallback_parameters() == []


def test_models_are_gin_configurable():
    gin.parse_config(["models.resnet18.num_classes = 100", "models.gpt.vocab_size = 32"])
    assert models.resnet18().fc.out_features == 100
    assert models.gpt(context=8, d_model=16, n_layers=1).head.out_features == 32
