"""``opt.coverage()`` against hand counts of elements; its one-line summary; ``curvlab run``
prints it before training and writes it to summary.json."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import curvlab
from curvlab import cli

pytestmark = pytest.mark.filterwarnings("ignore::curvlab.CurvatureFallbackWarning")


class Model(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)  # 40, embedding
        self.cls = nn.Parameter(torch.zeros(1, 1, 4))  # 4, root parameter: fallback
        self.lstm = nn.LSTM(4, 3, batch_first=True)  # 12·4 + 12·3 + 12 + 12 = 108: fallback
        self.norm = nn.LayerNorm(3)  # 3 + 3, layernorm
        self.frozen = nn.Linear(3, 3).requires_grad_(False)  # not trained: not counted
        self.head = nn.Linear(3, 10)  # 30 + 10, linear
        self.proj = nn.Linear(4, 10, bias=False)  # 40, linear; tied to emb.weight with tie=True
        if tie:
            self.proj.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        h = torch.cat([self.cls.expand(h.shape[0], 1, 4), h], 1)
        out, _ = self.lstm(h)
        return self.head(self.frozen(self.norm(out))) + self.proj(h)


def test_counts_by_hand():
    opt = curvlab.AdaFisherW(Model())
    cov = opt.coverage()
    assert [(c.name, c.module_type, c.adapter, c.elements) for c in cov.layers] == [
        ("emb", "Embedding", "embedding", 40),
        ("norm", "LayerNorm", "layernorm", 6),
        ("head", "Linear", "linear", 40),
        ("proj", "Linear", "linear", 40),
    ]
    assert [(f.name, f.shape, f.elements, f.rule) for f in cov.fallback] == [
        ("cls", (1, 1, 4), 4, "identity"),
        ("lstm.weight_ih_l0", (12, 4), 48, "identity"),
        ("lstm.weight_hh_l0", (12, 3), 36, "identity"),
        ("lstm.bias_ih_l0", (12,), 12, "identity"),
        ("lstm.bias_hh_l0", (12,), 12, "identity"),
    ]
    assert cov.fallback[0].reason == "no adapter for Model"
    assert cov.fallback[1].reason == "no adapter for LSTM"
    assert cov.covered_elements == 40 + 6 + 40 + 40 == 126
    assert cov.total_elements == 126 + 4 + 108 == 238
    assert cov.share == 126 / 238
    assert str(cov) == (
        "curvature coverage 52.94% (126 of 238 trainable elements): 4 layers (embedding 1, "
        "layernorm 1, linear 2); fallback 'identity' for 5 parameters (112 elements: no "
        "adapter for LSTM; no adapter for Model)"
    )
    assert "\n" not in str(cov)
    data = json.loads(json.dumps(cov.as_dict()))
    assert data["share"] == 126 / 238 and data["fallback"][1]["shape"] == [12, 4]


def test_tied_weights_count_once_and_param_groups_decide_what_is_trainable():
    model = Model(tie=True)
    cov = curvlab.AdaFisherW(model).coverage()
    # emb and proj share one (10, 4) tensor: both layers list it, the total has it once
    assert [(c.name, c.elements) for c in cov.layers][0::3] == [("emb", 40), ("proj", 40)]
    assert cov.covered_elements == 40 + 6 + 40 == 86
    assert cov.total_elements == 86 + 4 + 108 == 198

    # only the parameters given to the optimizer count
    params = [model.emb.weight, model.head.weight, model.lstm.weight_hh_l0]
    cov = curvlab.AdaFisherW(model, params=params).coverage()
    assert [(c.name, c.elements) for c in cov.layers] == [("emb", 40), ("head", 30), ("proj", 40)]
    assert cov.covered_elements == 70 and cov.total_elements == 106
    assert [f.name for f in cov.fallback] == ["lstm.weight_hh_l0"]


def test_squared_gradient_rule_and_elementwise_estimator():
    cov = curvlab.AdaFisherW(Model(), fallback="squared_gradient").coverage()
    assert {f.rule for f in cov.fallback} == {"squared_gradient"}
    assert "fallback 'squared_gradient' for 5 parameters" in str(cov)
    adam = curvlab.build_optimizer(Model(), "configs/adam.gin")
    cov = adam.coverage()
    assert cov.share == 1.0 and cov.elementwise == "squared_gradient"
    assert cov.total_elements == 238
    assert str(cov) == (
        "curvature coverage 100.00% (238 of 238 trainable elements): elementwise estimator "
        "'squared_gradient', every parameter its own"
    )


def test_share_is_never_rounded_to_a_whole_coverage():
    model = nn.Sequential(nn.Linear(100, 100), nn.PReLU())  # 10 100 covered, 1 not
    cov = curvlab.AdaFisher(model).coverage()
    assert cov.share == 10100 / 10101
    assert str(cov).startswith("curvature coverage 99.99% (10,100 of 10,101 ")


def test_curvlab_run_prints_coverage_and_writes_it_to_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "run",
            "configs/digits_adafisher.gin",
            "--out",
            str(out),
            "--bind",
            "train.epochs = 1",
            "--bind",
            "models.digits_cnn.width = 4",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("curvature coverage 100.00% (")  # before training
    assert lines[-1].startswith("final:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["coverage"]["share"] == 1.0
    assert summary["coverage"]["total_elements"] == summary["coverage"]["covered_elements"] > 0
    assert {layer["adapter"] for layer in summary["coverage"]["layers"]} >= {"conv2d", "linear"}
