"""curvlab inside PyTorch Lightning: ``configure_optimizers`` returns a curvlab optimizer.

Every Lightning run is compared with a plain PyTorch loop doing the same arithmetic (same
batches, same order of zero_grad / forward / backward / clip / step), bitwise: Lightning adds
nothing to the numbers, so any difference would be a curvlab integration bug (a closure
evaluated twice, statistics of one micro-batch lost, state not restored...).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import curvlab
from curvlab import OptimizerReplacedWarning

L = pytest.importorskip("lightning")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BATCH = 8


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def network() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).double()


class Classifier(L.LightningModule):
    def __init__(self, manual: bool = False, **optimizer_args) -> None:
        super().__init__()
        self.net = network()
        self.optimizer_args = optimizer_args
        self.automatic_optimization = not manual
        self.built: list[torch.optim.Optimizer] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        opt = curvlab.AdaFisher(self, **self.optimizer_args)
        self.built.append(opt)
        return opt


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loader() -> DataLoader:
    return DataLoader(data(), batch_size=BATCH, shuffle=False)


def reference(steps: int, accumulate: int = 1, clip: float | None = None, **optimizer_args):
    """The same training written as a plain loop."""
    net = network()
    opt = curvlab.AdaFisher(net, **optimizer_args)
    batches = list(loader())
    done = 0
    for start in range(0, len(batches), accumulate):
        if done == steps:
            break
        opt.zero_grad()
        for x, y in batches[start : start + accumulate]:
            (F.cross_entropy(net(x), y) / accumulate).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        done += 1
    return net, opt


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + ("forward" in m.__dict__) for m in model.modules())


ARGS = dict(lr=1e-2, weight_decay=1e-3)


def test_automatic_optimization_with_closure(tmp_path: Path) -> None:
    model = Classifier(**ARGS)
    trainer(tmp_path, max_steps=5).fit(model, loader())
    net, opt = reference(5, **ARGS)
    assert_same(model.net, net)
    assert model.built[0].metrics()["steps"] == 5
    torch.testing.assert_close(
        model.built[0].curvature_state["net.0"]["S"], opt.curvature_state["0"]["S"], rtol=0, atol=0
    )


def test_accumulate_grad_batches_averages_statistics(tmp_path: Path) -> None:
    model = Classifier(**ARGS)
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2).fit(model, loader())
    net, _ = reference(3, accumulate=2, **ARGS)
    assert_same(model.net, net)
    assert model.built[0].metrics()["steps"] == 3


def test_gradient_clipping(tmp_path: Path) -> None:
    model = Classifier(**ARGS)
    trainer(tmp_path, max_steps=4, gradient_clip_val=0.05).fit(model, loader())
    net, _ = reference(4, clip=0.05, **ARGS)
    assert_same(model.net, net)
    unclipped, _ = reference(4, **ARGS)
    assert not torch.equal(net[0].weight, unclipped[0].weight)  # the clip really acted


def test_manual_optimization(tmp_path: Path) -> None:
    model = Classifier(manual=True, **ARGS)
    trainer(tmp_path, max_steps=5).fit(model, loader())
    net, _ = reference(5, **ARGS)
    assert_same(model.net, net)


def test_ckpt_path_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = Classifier(**ARGS)
    trainer(tmp_path / "whole", max_epochs=4).fit(whole, loader())

    first = Classifier(**ARGS)
    run = trainer(tmp_path / "first", max_epochs=2)
    run.fit(first, loader())
    ckpt = tmp_path / "half.ckpt"
    run.save_checkpoint(ckpt)
    resumed = Classifier(**ARGS)
    trainer(tmp_path / "second", max_epochs=4).fit(resumed, loader(), ckpt_path=ckpt)
    assert_same(resumed.net, whole.net)
    assert resumed.built[0].metrics()["steps"] == whole.built[0].metrics()["steps"] == 24


def test_two_fits_leave_one_optimizers_hooks(tmp_path: Path) -> None:
    model = Classifier(**ARGS)
    bare = hook_count(model)
    trainer(tmp_path / "a", max_steps=2).fit(model, loader())
    assert hook_count(model) == bare + 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", max_steps=2).fit(model, loader())
    replaced = [w for w in caught if issubclass(w.category, OptimizerReplacedWarning)]
    assert len(replaced) == 1
    assert hook_count(model) == bare + 3
    first, second = model.built
    assert first.closed and not second.closed
    assert second.metrics()["steps"] == 2
