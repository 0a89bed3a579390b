"""The GPT of nn.TransformerEncoderLayer blocks (experiments/models/transformer_gpt.py) and its
benchmark workload ``gpt_mha``."""

import gin
import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.experiments import bench, models


def small(**kwargs):
    defaults = dict(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=4)
    return models.transformer_gpt(**{**defaults, **kwargs})


def test_shape_and_causal_mask():
    model = small().eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 12, 64)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # earlier positions do not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_blocks_are_torch_transformer_layers_and_the_head_is_tied():
    tied, untied = small(), small(tie_weights=False)
    layers = [m for m in tied.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(layer.norm_first for layer in layers)
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in tied.modules()) == 2
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight


@pytest.mark.parametrize("tie_weights", [True, False])
def test_adafisher_preconditions_every_parameter(tie_weights):
    model = small(tie_weights=tie_weights)
    opt = curvlab.AdaFisher(model, lr=1e-3)
    assert opt.fallback_parameters() == []
    idx = torch.randint(0, 64, (4, 16))
    F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert all(r.has_statistics for r in opt.layers)
    opt.step()
    assert opt.fallback_parameters() == []


def test_gin_configurable():
    gin.parse_config(["models.transformer_gpt.vocab_size = 32"])
    assert models.transformer_gpt(context=8, d_model=16, n_layers=1).head.out_features == 32


def test_bench_workload_builds_and_steps():
    work = bench.WORKLOADS["gpt_mha"]["quick"]()
    assert "TransformerEncoderLayer" in work.description
    model = work.build()
    assert isinstance(model, models.TransformerGPT)
    x, y = work.batch(torch.Generator().manual_seed(0))
    opt = curvlab.AdaFisher(model)
    work.loss(model(x), y).backward()
    opt.step()
    assert opt.fallback_parameters() == []
