"""The training loop behind ``curvlab run``: a gin-configured model, dataset and optimizer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.config import make_optimizer
from curvlab.experiments import models as _models  # noqa: F401 - registers @models.*
from curvlab.experiments.data import Split

TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")


@gin.configurable(module="baselines")
def torch_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.1, **kwargs: Any
) -> torch.optim.Optimizer:
    """A ``torch.optim`` baseline (``baselines.torch_optimizer.name = "Adam"``)."""
    if name not in TORCH_OPTIMIZERS:
        raise ValueError(f"baselines.torch_optimizer.name must be one of {TORCH_OPTIMIZERS}, got {name!r}")
    return getattr(torch.optim, name)(model.parameters(), lr=lr, **kwargs)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode without grad."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            loss_sum += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


@gin.configurable(module="train", denylist=["out_dir", "quiet"])
def train(
    model: Callable[[], nn.Module] = gin.REQUIRED,
    data: Callable[[], Split] = gin.REQUIRED,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = make_optimizer,
    epochs: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """Train ``model()`` on ``data()`` with ``optimizer(model)``; return the final summary.

    Writes ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``operative_config.gin``
    into ``out_dir`` when given.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    split = data()
    net = model().to(device)
    opt = optimizer(net)
    x_tr, y_tr = split.x_train.to(device), split.y_train.to(device)
    x_te, y_te = split.x_test.to(device), split.y_test.to(device)
    generator = torch.Generator().manual_seed(seed)

    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    start = time.perf_counter()
    summary: dict[str, float] = {}
    bar = tqdm(range(epochs), desc="epochs", disable=quiet, leave=False)
    for epoch in bar:
        net.train()
        order = torch.randperm(len(x_tr), generator=generator)
        loss_sum = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
        train_loss = float(loss_sum) / len(order)
        test_loss, test_acc = evaluate(net, x_te, y_te)
        summary = dict(
            epoch=epoch + 1,
            train_loss=train_loss,
            test_loss=test_loss,
            test_accuracy=test_acc,
            time_s=time.perf_counter() - start,
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{test_acc:.3f}")
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "operative_config.gin").write_text(gin.operative_config_str())
    return summary
