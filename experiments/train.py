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
from torch.utils.data import DistributedSampler

from curvlab.config import make_optimizer
from curvlab.experiments import models as _models  # noqa: F401 - registers @models.*
from curvlab.experiments.data import CifarAugment, Split
from curvlab.experiments.distributed import DistributedContext

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
    shuffle: bool = True,
    time_budget_s: float | None = None,
    time_budget_from: str | None = None,
    time_budget_epochs: int | None = None,
    num_threads: int | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    out_dir: str | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """Train ``model()`` on ``data()`` with ``optimizer(model)``; return the final summary.

    ``augment``: ``True`` applies :class:`CifarAugment` (crop, flip, Cutout; seeded with
    ``seed``) to every training batch, or pass any batched transform. Budgets: see the module
    docstring. ``num_threads`` sets torch's intra-op threads for the run (restored afterwards).
    Writes ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``operative_config.gin``
    into ``out_dir`` when given. ``shuffle = False`` takes the batches in the dataset's order,
    the same every epoch (the MNIST-1D reference protocol); by default each epoch is a new
    permutation.

    ``checkpoint_every = k`` saves model, optimizer (factors included) and RNG state to
    ``out_dir/checkpoint.pt`` every k epochs; ``resume = True`` continues from it (the run then
    equals an uninterrupted one bitwise on CPU). Under ``torchrun --nproc_per_node=N`` the run is
    data-parallel: DistributedDataParallel, a DistributedSampler giving each rank
    ``batch_size / N`` of every global batch, the ``torch_distributed`` reducer for the factor
    statistics (when the config says ``"none"``), and rank 0 writes every file.
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
                      time_budget_s, out_dir, quiet, checkpoint_every, resume, shuffle)
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
    checkpoint_every: int | None = None,
    resume: bool = False,
    shuffle: bool = True,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    ctx = DistributedContext.from_env(device)
    try:
        torch.manual_seed(seed)
        split = data()
        net = model().to(device)
        opt = optimizer(net)
        coverage = _coverage(opt, quiet or not ctx.is_main)
        trained = net
        if ctx.world > 1:
            if batch_size % ctx.world:
                raise ValueError(
                    f"train.batch_size = {batch_size} must be divisible by the {ctx.world} ranks"
                )
            _use_distributed_reducer(opt)
            trained = nn.parallel.DistributedDataParallel(net)
        if augment is True:
            augment = CifarAugment(seed=seed)
        x_tr, y_tr = split.x_train.to(device), split.y_train.to(device)
        x_te, y_te = split.x_test.to(device), split.y_test.to(device)
        generator = torch.Generator().manual_seed(seed)
        sampler = None
        if ctx.world > 1:
            sampler = DistributedSampler(
                range(len(x_tr)), num_replicas=ctx.world, rank=ctx.rank, shuffle=shuffle, seed=seed
            )

        out = Path(out_dir) if out_dir and ctx.is_main else None
        checkpoint = Path(out_dir) / "checkpoint.pt" if out_dir else None
        start_epoch, train_time, history = 0, 0.0, []
        if resume and checkpoint is not None and checkpoint.exists():
            state = torch.load(checkpoint, map_location=device, weights_only=False)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch, train_time, history = state["epoch"], state["train_time"], state["history"]
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            (out / "summary.json").unlink(missing_ok=True)  # present only once a run finished
        start = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
        summary: dict[str, float] = history[-1] if history else {}
        local_batch = batch_size // ctx.world
        bar = tqdm(
            range(start_epoch, epochs), desc="epochs", disable=quiet or not ctx.is_main,
            leave=False,
        )
        for epoch in bar:
            tick = time.perf_counter()
            trained.train()
            if sampler is None and not shuffle:
                order = torch.arange(len(x_tr))
            elif sampler is None:
                order = torch.randperm(len(x_tr), generator=generator)
            else:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler))
            loss_sum = torch.zeros((), device=device)
            for i in range(0, len(order), local_batch):
                idx = order[i : i + local_batch].to(device)
                inputs = x_tr[idx]
                if augment:
                    inputs = augment(inputs)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(trained(inputs), y_tr[idx])
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(idx)
            rows = torch.tensor(float(len(order)), device=device)
            train_loss = float(ctx.sum(loss_sum) / ctx.sum(rows))  # synchronises: real timing
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
            history.append(summary)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{test_acc:.3f}")
            if out:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(summary) + "\n")
            if checkpoint is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
                state = dict(
                    epoch=epoch + 1,
                    model=net.state_dict(),
                    optimizer=opt.state_dict(),
                    generator=generator.get_state(),
                    torch_rng=torch.get_rng_state(),
                    train_time=train_time,
                    history=history,
                )
                if ctx.is_main:
                    torch.save(state, checkpoint)
            if time_budget_s is not None and train_time >= time_budget_s:
                break
        if time_budget_s is not None:
            summary["time_budget_s"] = float(time_budget_s)
        if ctx.world > 1:
            summary["world_size"] = ctx.world
        if out:
            (out / "operative_config.gin").write_text(gin.operative_config_str())
            (out / "summary.json").write_text(json.dumps({**summary, **coverage}, indent=2))
        return summary
    finally:
        ctx.close()


def _coverage(opt: torch.optim.Optimizer, quiet: bool) -> dict[str, Any]:
    """A curvlab optimizer's curvature coverage: printed as one line (unless quiet) and
    returned as ``{"coverage": ...}`` for summary.json (``{}`` for other optimizers)."""
    report = getattr(opt, "coverage", None)
    if not callable(report):
        return {}
    coverage = report()
    if not quiet:
        print(coverage, flush=True)
    return {"coverage": coverage.as_dict()}


def _use_distributed_reducer(opt: torch.optim.Optimizer) -> None:
    """Factor statistics must be averaged across ranks: swap a single-process reducer."""
    from curvlab import registry
    from curvlab.optimizer import CurvatureOptimizer
    from curvlab.plugins.reducers.none import NoReducer

    if isinstance(opt, CurvatureOptimizer) and isinstance(opt.reducer, NoReducer):
        # each rank's loss is the mean over its own samples (plain DDP)
        opt.reducer = registry.create("reducers", "torch_distributed", loss_convention="local_mean")
