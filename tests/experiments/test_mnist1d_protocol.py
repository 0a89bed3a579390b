"""The MNIST-1D reference protocol: batches in order (train.shuffle), the configs, the grids."""

import math
import re

import gin
import pytest
import torch
from torch import nn

from curvlab.config import CONFIG_ROOT, make_optimizer, parse_config
from curvlab.experiments import ablate, models
from curvlab.experiments.data import Split
from curvlab.experiments.mnist1d_study import STUDIES, read_lr_file
from curvlab.experiments.train import train

CONFIGS = sorted(p.name for p in CONFIG_ROOT.glob("mnist1d_*.gin") if p.stem != "mnist1d_protocol")
ADAM = ["mnist1d_logistic_adam.gin", "mnist1d_mlp_adam.gin", "mnist1d_cnn_adam.gin",
        "mnist1d_gru_adam.gin"]


class Recorder(nn.Linear):
    """A linear model that remembers the inputs of its training forwards."""

    def __init__(self) -> None:
        super().__init__(1, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return super().forward(x)


def numbered(n=10):
    x = torch.arange(float(n))[:, None]
    return Split(x, torch.zeros(n, dtype=torch.long), x[:2], torch.zeros(2, dtype=torch.long), 2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_in_order_without_shuffle(shuffle):
    model = Recorder()
    train(model=lambda: model, data=numbered,
          optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0),
          epochs=2, batch_size=4, shuffle=shuffle, quiet=True)
    batches = [b.flatten().tolist() for b in model.seen]
    assert [len(b) for b in batches] == [4, 4, 2] * 2
    epochs = [sum(batches[:3], []), sum(batches[3:], [])]
    if not shuffle:  # the dataset's order, the same every epoch (the reference protocol)
        assert epochs == [list(map(float, range(10)))] * 2
    else:  # a new permutation every epoch
        assert all(sorted(e) == list(map(float, range(10))) for e in epochs)
        assert epochs[0] != epochs[1]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_parse_to_the_protocol(config):
    parse_config(config)
    assert gin.query_parameter("train.data").selector == "data.mnist1d"
    assert gin.query_parameter("train.batch_size") == 100
    assert gin.query_parameter("train.epochs") == 200  # 8000 steps of 100 out of 4000
    assert gin.query_parameter("train.shuffle") is False
    assert gin.query_parameter("train.model").selector.startswith("models.mnist1d_")
    if config in ADAM:
        assert gin.query_parameter("baselines.torch_optimizer.name") == "Adam"
        assert gin.query_parameter("baselines.torch_optimizer.lr") == 1e-2


def test_the_configs_cover_the_issue():
    assert set(ADAM) < set(CONFIGS)
    for name in ("adafisher", "adafisherw", "kfac", "banded", "sgd"):
        assert f"mnist1d_cnn_{name}.gin" in CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
# parameters without an adapter (the GRU's weights) fall back to identity, with a warning
@pytest.mark.filterwarnings("ignore::curvlab.optimizer.CurvatureFallbackWarning")
def test_each_config_trains_one_epoch(config, mnist1d_cache):
    parse_config(config, ["train.epochs = 1", f"data.mnist1d.cache_dir = '{mnist1d_cache}'"])
    summary = train(quiet=True)
    assert summary["epoch"] == 1 and math.isfinite(summary["train_loss"])
    if config in ("mnist1d_cnn_adam.gin", "mnist1d_mlp_adam.gin"):
        assert summary["test_accuracy"] > 0.2  # 40 steps at lr 1e-2: well above chance (0.1)


@pytest.mark.parametrize(
    "config", ["mnist1d_cnn_adafisher.gin", "mnist1d_cnn_adafisherw.gin", "mnist1d_cnn_kfac.gin",
               "mnist1d_cnn_banded.gin"],
)
def test_curvature_optimizers_cover_the_whole_cnn(config):
    """Three Conv1d layers (the "conv" adapter) and the Linear head: every element."""
    parse_config(config)
    coverage = make_optimizer(models.mnist1d_cnn()).coverage()
    assert coverage.share == 1.0 and coverage.total_elements == 5210 and not coverage.fallback
    assert coverage.by_adapter() == {"conv": 3, "linear": 1}


@pytest.mark.filterwarnings("ignore::curvlab.optimizer.CurvatureFallbackWarning")
def test_coverage_of_the_gru_the_batchnorm_cnn_and_the_official_variant():
    parse_config("mnist1d_gru_adafisher.gin")
    gru = make_optimizer(models.mnist1d_gru()).coverage()
    assert gru.covered_elements == 4810 and gru.total_elements == 5134  # the Linear head only
    assert len(gru.fallback) == 8 and all(f.name.startswith("gru.") for f in gru.fallback)
    parse_config("mnist1d_cnn_adafisher.gin")
    bn = make_optimizer(models.mnist1d_cnn(batch_norm=True)).coverage()
    assert bn.share == 1.0 and bn.by_adapter() == {"conv": 3, "batchnorm": 3, "linear": 1}
    # the published code's layer set has no Conv1d: its convolutions get F = 1 (SPEC §3)
    parse_config("mnist1d_cnn_adafisher.gin", ["include 'adafisher_official.gin'"])
    official = make_optimizer(models.mnist1d_cnn()).coverage()
    assert official.covered_elements == 1260 and len(official.fallback) == 6


# -- the study's grid files ----------------------------------------------------------------------
MACRO = re.compile(r"%(LR_[A-Z0-9_]+)")


def grid(path: str) -> ablate.Grid:
    return ablate.load_grid(CONFIG_ROOT / path)


def test_grid_files_load_and_every_rate_macro_is_defined():
    macros, status = read_lr_file(CONFIG_ROOT / "ablations" / "mnist1d_lr.gin")
    assert set(status) == {"LR_CNN", "LR_GRU"}
    for study in STUDIES.values():
        g = grid(study.grid)
        used = {m for items in g.variants.values() for i in items for m in MACRO.findall(i)}
        assert used and used <= set(macros), (study.grid, used - set(macros))
        assert all(m.startswith(study.prefix + "_") for m in used)
        assert g.seeds == (0, 1, 2, 3, 4)
        assert len(g.runs("out")) == 5 * len(g.variants)


@pytest.mark.parametrize("study", [s for s in STUDIES.values() if s.sweep])
def test_each_grid_variant_has_a_sweep_over_several_rates(study):
    sweep, components = grid(study.sweep), grid(study.grid)
    bases: dict[str, list[float]] = {}
    for name, items in sweep.variants.items():
        base, _, lr = name.rpartition("_lr")
        bases.setdefault(base, []).append(float(lr))
        assert f" = {lr}" in items[-1]  # the name says the rate the run uses
    assert set(bases) == set(components.variants)
    # at least 4 rates per CNN optimizer, 3 per GRU one (a GRU run costs about 3 CNN runs),
    # ascending, each ~3x the last (a half-decade log grid)
    fewest = 4 if study.prefix == "LR_CNN" else 3
    for lrs in bases.values():
        assert len(lrs) >= fewest and lrs == sorted(lrs)
        assert all(2.9 < b / a < 3.5 for a, b in zip(lrs, lrs[1:])), lrs
    # the sweep is on the validation split (3200 sequences: 32 batches of 100 per epoch) at a
    # quarter of the protocol's 8000 steps: 63 epochs, 2016 steps
    assert "data.mnist1d.validation = True" in sweep.bindings
    assert "train.epochs = 63" in sweep.bindings
    # a sweep variant is the grid variant with a rate: same items otherwise
    for name, items in sweep.variants.items():
        assert items[:-1] == components.variants[name.rpartition("_lr")[0]][:-1]


def test_reference_grid_runs_the_four_published_models():
    g = grid("ablations/mnist1d_reference.gin")
    assert list(g.variants) == ["logistic", "mlp", "cnn", "gru"] and len(g.seeds) >= 3
    runs = g.runs("out")
    assert {r.config for r in runs} == {str(CONFIG_ROOT / c) for c in ADAM}
