"""The training loop behind ``curvlab run``: a gin-configured model, dataset and optimizer.

Budgets (the paper's wall-clock protocol): ``train.time_budget_s`` stops training after the first
epoch whose cumulative training time exceeds the budget; ``train.time_budget_from`` (a reference
run's directory or its summary.json / metrics.jsonl) with ``train.time_budget_epochs = N`` sets
the budget to the training time that run took for its first N epochs. ``train.epochs`` stays an
upper bound. Training time excludes evaluation (``train_time_s``); ``time_s`` is the elapsed time
including evaluation.

Failure handling (docs/reliability.md, "Runs"): the output directory is never silently
overwritten (``--overwrite``); checkpoints are written atomically and read without running code
(:mod:`curvlab.experiments.checkpoint`); a resume refuses changed settings; a step that a
curvlab optimizer skips on a non-finite value leaves no trace (BatchNorm statistics included) and
is counted as ``skipped_steps``; a run whose every step was skipped, or whose final test loss is
not finite, ends with :class:`~curvlab.experiments.rundir.RunFailed` after writing its files.
"""

from __future__ import annotations

import json
import math
import os
import sys
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
from curvlab.experiments import rundir
from curvlab.experiments.checkpoint import (
    changed_bindings,
    config_bindings,
    load_checkpoint,
    remove_older_sharded,
    restore,
    restore_sharded,
    resume_path,
    save_checkpoint,
    save_sharded,
)
from curvlab.experiments.data import CifarAugment, Split
from curvlab.experiments.distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedContext,
    broadcast_buffers,
    is_timeout,
    shard_model,
)
from curvlab.validation import ConfigError, check_int, check_positive_int, check_range

TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW")
#: train.parallel under torchrun: DistributedDataParallel or FSDP2 (fully_shard)
PARALLEL = ("ddp", "fsdp")
#: train.* settings a resumed run may change (the others must equal the checkpoint's)
MAY_CHANGE_ON_RESUME = tuple(
    ("train", name)
    for name in (
        "epochs", "resume", "checkpoint_every", "num_threads", "device", "time_budget_s",
        "time_budget_from", "time_budget_epochs", "distributed_timeout_s",
    )
)  # fmt: skip


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
    check_range("baselines.torch_optimizer.lr", lr, 0.0)
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


@gin.configurable(module="train", denylist=["out_dir", "quiet", "overwrite"])
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
    resume: bool | str = False,
    distributed_timeout_s: float = DEFAULT_TIMEOUT_S,
    parallel: str = "ddp",
    out_dir: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train ``model()`` on ``data()`` with ``optimizer(model)``; return the final summary.

    ``augment``: ``True`` applies :class:`CifarAugment` (crop, flip, Cutout; seeded with
    ``seed``) to every training batch, or pass any batched transform. Budgets: see the module
    docstring. ``num_threads`` sets torch's intra-op threads for the run (restored afterwards).
    Writes ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``operative_config.gin``
    into ``out_dir`` when given; a directory that already holds a run is refused unless
    ``overwrite`` (``--overwrite``) or the run resumes it.
    ``shuffle = False`` takes the batches in the dataset's order, the same every epoch (the
    MNIST-1D reference protocol); by default each epoch is a new permutation.

    ``checkpoint_every = k`` saves model, optimizer (factors included) and RNG state to
    ``out_dir/checkpoint.pt`` every k epochs (atomically). ``resume = True`` continues from it
    (the run then equals an uninterrupted one bitwise on CPU), ``resume = "path"`` from that
    checkpoint; every setting but those in :data:`MAY_CHANGE_ON_RESUME` (epochs, budgets,
    threads, device, ...) must equal the checkpoint's, else the resume is refused with the list
    of differences. Under ``torchrun --nproc_per_node=N`` the run is
    data-parallel: DistributedDataParallel, a DistributedSampler giving each rank
    ``batch_size / N`` of every global batch, the ``torch_distributed`` reducer for the factor
    statistics (when the config says ``"none"``), rank 0 writes every file, and every
    collective waits at most ``distributed_timeout_s`` seconds. ``parallel = "fsdp"`` shards the
    model with FSDP2 instead of DDP (:func:`~curvlab.experiments.distributed.shard_model`: every
    direct child with parameters, then the root); its checkpoints are sharded
    (:mod:`curvlab.distributed_checkpoint`, a directory next to ``checkpoint.pt``) and resume on
    any number of ranks.

    Each metrics row and the summary count the optimizer ``steps`` and the ``skipped_steps``
    (steps a curvlab optimizer skipped on a non-finite loss, gradient or statistic).
    """
    _check_arguments(
        model=model, data=data, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
        seed=seed, device=device, augment=augment, time_budget_s=time_budget_s,
        num_threads=num_threads, checkpoint_every=checkpoint_every, out_dir=out_dir,
        distributed_timeout_s=distributed_timeout_s, parallel=parallel,
    )  # fmt: skip
    if time_budget_from is not None:
        if time_budget_s is not None:
            raise ValueError("give train.time_budget_s or train.time_budget_from, not both")
        if time_budget_epochs is None:
            raise ValueError("train.time_budget_from needs train.time_budget_epochs (an int)")
        check_positive_int("train.time_budget_epochs", time_budget_epochs)
        time_budget_s = reference_time(time_budget_from, time_budget_epochs)
    elif time_budget_epochs is not None:
        raise ValueError("train.time_budget_epochs needs train.time_budget_from")
    resume_from = resume_path(resume, out_dir, "train.resume")

    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(model, data, optimizer, epochs, batch_size, seed, device, augment,
                      time_budget_s, out_dir, quiet, checkpoint_every, resume_from,
                      distributed_timeout_s, overwrite, shuffle, parallel)
    finally:
        torch.set_num_threads(threads_before)


def _check_arguments(**kw: Any) -> None:
    """Every train.* value, before anything is loaded (one line naming the key)."""
    for key in ("model", "data", "optimizer"):
        if not callable(kw[key]):
            raise ConfigError(
                f"train.{key} must be a gin reference such as @models.mlp or a callable, "
                f"got {kw[key]!r}"
            )
    check_positive_int("train.epochs", kw["epochs"])
    check_positive_int("train.batch_size", kw["batch_size"])
    check_int("train.seed", kw["seed"], 0)
    if kw["num_threads"] is not None:
        check_positive_int("train.num_threads", kw["num_threads"])
    if kw["checkpoint_every"] is not None:
        check_positive_int("train.checkpoint_every", kw["checkpoint_every"])
        if kw["out_dir"] is None:
            raise ConfigError("train.checkpoint_every needs an output directory: give --out DIR")
    if kw["time_budget_s"] is not None:
        check_range("train.time_budget_s", kw["time_budget_s"], 0.0)
    check_range("train.distributed_timeout_s", kw["distributed_timeout_s"], 0.0,
                low_inclusive=False)
    augment = kw["augment"]
    if not (isinstance(augment, bool) or callable(augment)):
        raise ConfigError(f"train.augment must be True, False or a callable, got {augment!r}")
    check_device("train.device", kw["device"])
    if kw["parallel"] not in PARALLEL:
        raise ConfigError(
            f"train.parallel must be one of {', '.join(map(repr, PARALLEL))}, "
            f"got {kw['parallel']!r}"
        )


def check_device(key: str, device: Any) -> None:
    """``device`` names a device this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    if not isinstance(device, str):
        raise ConfigError(f"{key} must be a device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{key} = {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} = {device!r}, but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key} = {device!r}, but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s)"
            )


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
    checkpoint_every: int | None,
    resume_from: Path | None,
    timeout_s: float,
    overwrite: bool,
    shuffle: bool,
    parallel: str,
) -> dict[str, float]:
    ctx = DistributedContext.from_env(device, timeout_s)
    try:
        return _train_in_context(
            ctx, model, data, optimizer, epochs, batch_size, seed, device, augment,
            time_budget_s, out_dir, quiet, checkpoint_every, resume_from, overwrite, shuffle,
            parallel,
        )  # fmt: skip
    except RuntimeError as err:
        if ctx.world > 1 and is_timeout(err):
            raise ctx.timeout_error(err) from err
        raise
    finally:
        ctx.close()


def _train_in_context(
    ctx: DistributedContext,
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
    checkpoint_every: int | None,
    resume_from: Path | None,
    overwrite: bool,
    shuffle: bool,
    parallel: str,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    checkpoint = Path(out_dir) / rundir.CHECKPOINT if out_dir else None
    # read before the (possibly long) data and model set-up: a bad file fails at once, and
    # before anything in the output directory changes
    state = load_checkpoint(resume_from, map_location=device) if resume_from else None
    out = None
    if out_dir and ctx.is_main:
        in_place = resume_from is not None and resume_from.resolve() == checkpoint.resolve()
        out = rundir.prepare(out_dir, keep=in_place, overwrite=overwrite)

    torch.manual_seed(seed)
    split = data()
    net = model().to(device)
    fsdp = parallel == "fsdp" and ctx.world > 1
    if fsdp:  # before the optimizer: it must hold the sharded parameters
        shard_model(net)
    opt = optimizer(net)
    coverage = report_coverage(opt, quiet or not ctx.is_main)
    trained = net
    if ctx.world > 1:
        if batch_size % ctx.world:
            raise ConfigError(
                f"train.batch_size = {batch_size} must be divisible by the {ctx.world} ranks"
            )
        _use_distributed_reducer(opt, ctx.timeout_s)
        if not fsdp:
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

    start_epoch, train_time, steps, history = 0, 0.0, 0, []
    if state is not None:
        changed = changed_bindings(state["config"], config_bindings(), MAY_CHANGE_ON_RESUME)
        if changed:
            raise ConfigError(
                f"cannot resume from {resume_from}: it was saved with other settings "
                f"({'; '.join(changed)}). A resumed run continues the same run; start a new one "
                f"(another --out, or --overwrite) to change them"
            )
        if "sharded" in state:  # model and optimizer in a DCP directory next to the file
            restore_sharded(resume_from.parent / state["sharded"], net, opt)
        else:
            restore(resume_from, net, opt, state)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "augment_rng" in state and hasattr(augment, "generator"):
            augment.generator.set_state(state["augment_rng"])
        start_epoch, train_time = state["epoch"], state["train_time"]
        steps, history = state["steps"], state["history"]
    if out:
        rundir.start(out, history)
    start = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
    summary: dict[str, Any] = dict(history[-1]) if history else {}
    local_batch = batch_size // ctx.world
    bar = tqdm(
        range(start_epoch, epochs), desc="epochs", disable=quiet or not ctx.is_main, leave=False
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
        rows = torch.zeros((), device=device)
        for i in range(0, len(order), local_batch):
            idx = order[i : i + local_batch].to(device)
            inputs = x_tr[idx]
            if augment:
                inputs = augment(inputs)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(trained(inputs), y_tr[idx])
            loss.backward()
            opt.step()
            steps += 1
            # the mean over batches with a finite loss (a skipped batch's NaN is left out)
            finite = loss.detach().isfinite()
            loss_sum += torch.where(finite, loss.detach() * len(idx), 0.0)
            rows += finite * len(idx)
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
            steps=steps,
            skipped_steps=skipped_steps(opt),
        )
        history.append(summary)
        bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{test_acc:.3f}")
        if out:
            rundir.append_jsonl(out / rundir.METRICS, summary)
        if checkpoint is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            state = dict(
                kind="train",
                epoch=epoch + 1,
                steps=steps,
                generator=generator.get_state(),
                torch_rng=torch.get_rng_state(),
                train_time=train_time,
                history=history,
                config=config_bindings(),
            )
            if hasattr(augment, "generator"):
                state["augment_rng"] = augment.generator.get_state()
            if fsdp:  # every rank writes its shards; the file then points at them
                broadcast_buffers(net)
                state["sharded"] = save_sharded(checkpoint, epoch + 1, net, opt, ctx)
            else:
                state.update(model=net.state_dict(), optimizer=opt.state_dict())
            if ctx.is_main:
                save_checkpoint(state, checkpoint)
                # (a one-process resume of a sharded run writes the whole state in the file)
                remove_older_sharded(checkpoint, state.get("sharded", ""))
        if time_budget_s is not None and train_time >= time_budget_s:
            break
    summary = dict(summary)
    if time_budget_s is not None:
        summary["time_budget_s"] = float(time_budget_s)
    if ctx.world > 1:
        summary["world_size"] = ctx.world
    if out:
        write_outputs(out, {**summary, **coverage})
    if ctx.is_main:
        check_outcome(summary)
    return summary


def report_coverage(opt: torch.optim.Optimizer, quiet: bool) -> dict[str, Any]:
    """A curvlab optimizer's curvature coverage: printed as one line (unless quiet) and
    returned as ``{"coverage": ...}`` for summary.json (``{}`` for other optimizers)."""
    report = getattr(opt, "coverage", None)
    if not callable(report):
        return {}
    coverage = report()
    if not quiet:
        print(coverage, flush=True)
    return {"coverage": coverage.as_dict()}


def skipped_steps(opt: torch.optim.Optimizer) -> int:
    """Steps the optimizer skipped on a non-finite value (0 for torch.optim baselines, which
    never skip)."""
    metrics = getattr(opt, "metrics", None)
    return int(metrics().get("skipped_steps", 0)) if callable(metrics) else 0


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    """The files a finished run leaves: operative_config.gin and, last, summary.json."""
    rundir.atomic_write_text(out / rundir.CONFIG, gin.operative_config_str())
    rundir.write_json(out / rundir.SUMMARY, summary)


def check_outcome(summary: dict[str, Any], loss_key: str = "test_loss") -> None:
    """Report skipped steps on the console; raise :class:`RunFailed` for a run that trained
    nothing (every step skipped) or whose final ``loss_key`` is not finite."""
    steps, skipped = summary.get("steps", 0), summary.get("skipped_steps", 0)
    if skipped:
        print(
            f"warning: {skipped} of {steps} optimizer steps were skipped on a non-finite loss, "
            f"gradient or curvature statistic (skipped_steps in metrics.jsonl)",
            file=sys.stderr,
        )
    if steps and skipped == steps:
        raise rundir.RunFailed(
            f"all {steps} optimizer steps were skipped on non-finite values: nothing was "
            f"trained (look for NaN/inf in the data, or lower the learning rate)"
        )
    loss = summary.get(loss_key)
    if isinstance(loss, float) and not math.isfinite(loss):
        raise rundir.RunFailed(
            f"the final {loss_key} is {loss}: the model's outputs are not finite (it diverged, "
            f"or the evaluation data holds NaN/inf)"
        )


def _use_distributed_reducer(opt: torch.optim.Optimizer, timeout_s: float) -> None:
    """Factor statistics must be averaged across ranks: swap a single-process reducer; every
    wait of the reducer is bounded by ``timeout_s``."""
    from curvlab import registry
    from curvlab.optimizer import CurvatureOptimizer
    from curvlab.plugins.reducers.none import NoReducer

    if isinstance(opt, CurvatureOptimizer) and isinstance(opt.reducer, NoReducer):
        # each rank's loss is the mean over its own samples (plain DDP)
        opt.reducer = registry.create(
            "reducers", "torch_distributed", loss_convention="local_mean", timeout_s=timeout_s
        )
    elif getattr(getattr(opt, "reducer", None), "timeout_s", 0) is None:
        opt.reducer.timeout_s = timeout_s
