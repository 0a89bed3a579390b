"""The training loop behind ``curvlab run``: a gin-configured model, dataset and optimizer.

Budgets (the paper's wall-clock protocol): ``train.time_budget_s`` stops training after the first
epoch whose cumulative training time exceeds the budget; ``train.time_budget_from`` (a reference
run's directory or its summary.json / metrics.jsonl) with ``train.time_budget_epochs = N`` sets
the budget to the training time that run took for its first N epochs. ``train.epochs`` stays an
upper bound. Training time excludes evaluation (``train_time_s``); ``time_s`` is the elapsed time
including evaluation.
"""

from __future__ import annotations

import json
import os
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
from curvlab.experiments.data import CifarAugment, Split

TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")


@gin.configurable(module="baselines")
def torch_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.1, **kwargs: Any
) -> torch.optim.Optimizer:
    """A ``torch.optim`` baseline (``train.optimizer = @baselines.torch_optimizer``,
    ``baselines.torch_optimizer.name = "Adam"``; extra bindings such as ``momentum`` or
    ``weight_decay`` are passed through)."""
    if name not in TORCH_OPTIMIZERS:
        raise ValueError(
            f"baselines.torch_optimizer.name must be one of {TORCH_OPTIMIZERS}, got {name!r}"
        )
    return getattr(torch.optim, name)(model.parameters(), lr=lr, **kwargs)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
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


def reference_time(reference: str | os.PathLike, epochs: int) -> float:
    """Training time a reference run took for its first ``epochs`` epochs.

    ``reference`` is the run's directory, its summary.json or its metrics.jsonl; the time is read
    from metrics.jsonl (``train_time_s``, or ``time_s`` for runs that predate it).
    """
    path = Path(reference)
    metrics = path / "metrics.jsonl" if path.is_dir() else path.with_name("metrics.jsonl")
    if not metrics.is_file():
        raise FileNotFoundError(
            f"train.time_budget_from: no metrics.jsonl at {metrics} (give a run directory "
            f"written by `curvlab run --out DIR`, or its summary.json)"
        )
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["epoch"] == epochs:
            return float(row.get("train_time_s", row["time_s"]))
    raise ValueError(
        f"train.time_budget_epochs = {epochs}, but the reference run {metrics} has only "
        f"{len(rows)} epoch(s)"
    )


@gin.configurable(module="train", denylist=["out_dir", "quiet"])
def train(
    model: Callable[[], nn.Module] = gin.REQUIRED,
    data: Callable[[], Split] = gin.REQUIRED,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = make_optimizer,
    epochs: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    augment: bool | Callable[[torch.Tensor], torch.Tensor] = False,
    time_budget_s: float | None = None,
    time_budget_from: str | None = None,
    time_budget_epochs: int | None = None,
    num_threads: int | None = None,
    out_dir: str | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """Train ``model()`` on ``data()`` with ``optimizer(model)``; return the final summary.

    ``augment``: ``True`` applies :class:`CifarAugment` (crop, flip, Cutout; seeded with
    ``seed``) to every training batch, or pass any batched transform. Budgets: see the module
    docstring. ``num_threads`` sets torch's intra-op threads for the run (restored afterwards).
    Writes ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``operative_config.gin``
    into ``out_dir`` when given.
    """
    if time_budget_from is not None:
        if time_budget_s is not None:
            raise ValueError("give train.time_budget_s or train.time_budget_from, not both")
        if time_budget_epochs is None:
            raise ValueError("train.time_budget_from needs train.time_budget_epochs (an int)")
        time_budget_s = reference_time(time_budget_from, time_budget_epochs)
    elif time_budget_epochs is not None:
        raise ValueError("train.time_budget_epochs needs train.time_budget_from")

    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(model, data, optimizer, epochs, batch_size, seed, device, augment,
                      time_budget_s, out_dir, quiet)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    model: Callable[[], nn.Module],
    data: Callable[[], Split],
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    epochs: int,
    batch_size: int,
    seed: int,
    device: str,
    augment: bool | Callable[[torch.Tensor], torch.Tensor],
    time_budget_s: float | None,
    out_dir: str | None,
    quiet: bool,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    split = data()
    net = model().to(device)
    opt = optimizer(net)
    if augment is True:
        augment = CifarAugment(seed=seed)
    x_tr, y_tr = split.x_train.to(device), split.y_train.to(device)
    x_te, y_te = split.x_test.to(device), split.y_test.to(device)
    generator = torch.Generator().manual_seed(seed)

    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
        (out / "summary.json").unlink(missing_ok=True)  # present only once a run has finished
    start = time.perf_counter()
    train_time = 0.0
    summary: dict[str, float] = {}
    bar = tqdm(range(epochs), desc="epochs", disable=quiet, leave=False)
    for epoch in bar:
        tick = time.perf_counter()
        net.train()
        order = torch.randperm(len(x_tr), generator=generator)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size].to(device)
            inputs = x_tr[idx]
            if augment:
                inputs = augment(inputs)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(inputs), y_tr[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
        train_loss = float(loss_sum) / len(order)  # synchronises, so the epoch time is real
        train_time += time.perf_counter() - tick
        test_loss, test_acc = evaluate(net, x_te, y_te)
        summary = dict(
            epoch=epoch + 1,
            train_loss=train_loss,
            test_loss=test_loss,
            test_accuracy=test_acc,
            train_time_s=train_time,
            time_s=time.perf_counter() - start,
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{test_acc:.3f}")
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
        if time_budget_s is not None and train_time >= time_budget_s:
            break
    if time_budget_s is not None:
        summary["time_budget_s"] = float(time_budget_s)
    if out:
        (out / "operative_config.gin").write_text(gin.operative_config_str())
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
