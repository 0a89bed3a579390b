"""Worker for the distributed reducer tests: ``python -m tests.plugins.reducers._dist_worker OUT``.

Started once per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment, as torchrun
sets them) by ``test_torch_distributed.py``; joins a gloo group on 127.0.0.1, runs every scenario
in :data:`SCENARIOS`, saves ``OUT/rank{r}.pt`` and destroys the group. Each scenario is isolated:
an exception is recorded in the result instead of ending the worker (the other ranks would then
wait for a collective until the group's timeout).

The same :func:`train` function computes the single-process reference (``world=1``) in the test
process, so both sides run identical arithmetic apart from the reduction.

Loss scaling for an exact match with one process (docs/distributed.md, "Loss scaling"): every rank
uses ``Σ_{its rows} loss / N_global`` and gradients are *summed* over ranks (a DDP comm hook). The
output gradients that the curvature hooks see are then those of the full-batch mean loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

import curvlab

STEPS = 10
N_GLOBAL = 8
LR = 1e-3


# -- models and data (float64, deterministic) ------------------------------------------------------
def make_model(name: str) -> nn.Module:
    torch.manual_seed(1234)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(6, 16),
            nn.LayerNorm(16),
            nn.Tanh(),
            nn.Linear(16, 12),
            nn.LayerNorm(12),
            nn.Tanh(),
            nn.Linear(12, 3),
        )
    elif name == "cnn":  # no BatchNorm (its statistics are per-rank); a grouped conv for 2-D H
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 3),
        )
    else:
        raise ValueError(name)
    return model.double()


def make_batches(name: str, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(99)
    shape = (6,) if name == "mlp" else (2, 8, 8)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


def rank_rows(n: int, world: int, rank: int, split: list[int] | None = None) -> slice:
    """Rows of rank ``rank``: equal halves, or the given per-rank sizes."""
    sizes = split if split is not None else [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def sum_hook(group, bucket):  # noqa: ANN001, ANN201 - DDP comm hook: Σ over ranks, no division
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# -- one training run ------------------------------------------------------------------------------
def train(
    model_name: str,
    *,
    world: int = 1,
    rank: int = 0,
    sizes: list[int] | None = None,
    splits: list[list[int]] | None = None,
    micro_batches: int = 1,
    curvature_interval: int = 1,
    reducer: object = "none",
    ddp: bool = False,
    loss_convention: str = "global",
    before_step: Callable[[int, nn.Module], None] | None = None,
    step_hook: Callable[[int, Callable[[], None]], None] | None = None,
    poison_input: tuple[int, int] | None = None,
    estimator: tuple[str, dict] = ("diagonal", {}),
    steps: int = STEPS,
) -> dict:
    """Train ``steps`` AdaFisher steps; returns final parameters and optimizer metrics.

    ``world == 1``: the reference, mean loss over the full batch. Otherwise rank ``rank`` takes
    its rows of every batch (``splits[step]`` per-rank sizes, or equal parts), split again into
    ``micro_batches`` accumulated under DDP ``no_sync()``. ``loss_convention="global"`` scales
    each rank's summed loss by 1/N_global with gradients summed (exact); ``"ddp_mean"`` is plain
    DDP usage (local mean loss, gradients averaged) for comparison. ``poison_input=(step, rank)``
    puts a NaN into that rank's batch at that step. ``estimator``: (registered name, arguments).
    """
    sizes = sizes or [N_GLOBAL] * steps
    model = make_model(model_name)
    net: nn.Module = model
    if ddp:
        net = nn.parallel.DistributedDataParallel(model)
        if loss_convention == "global":
            net.register_comm_hook(None, sum_hook)
    opt = curvlab.AdaFisher(
        model,
        lr=LR,
        curvature_interval=curvature_interval,
        reducer=reducer,
        estimator=curvlab.registry.create("estimators", estimator[0], **estimator[1]),
    )
    for step, (x, y) in enumerate(make_batches(model_name, sizes)):
        n = x.shape[0]
        if world > 1:
            rows = rank_rows(n, world, rank, None if splits is None else splits[step])
            x, y = x[rows], y[rows]
        if poison_input == (step, rank):
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad()
        parts = (x.tensor_split(micro_batches), y.tensor_split(micro_batches))
        chunks = list(zip(*parts, strict=True))
        for m, (xm, ym) in enumerate(chunks):
            last = m == len(chunks) - 1
            sync = contextlib.nullcontext() if (last or not ddp) else net.no_sync()
            with sync:
                out = net(xm)
                if world == 1 and micro_batches == 1:
                    loss = F.cross_entropy(out, ym)  # the reference: mean over the full batch
                elif loss_convention == "global":
                    loss = F.cross_entropy(out, ym, reduction="sum") / n
                else:  # plain DDP: local mean (of this micro-batch's share)
                    loss = F.cross_entropy(out, ym) / len(chunks)
                loss.backward()
        if before_step is not None:
            before_step(step, model)
        if step_hook is not None:
            step_hook(step, opt.step)
        else:
            opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "metrics": opt.metrics(),
    }


# -- scenarios (run on every rank) -----------------------------------------------------------------
def _reducer(**kwargs: object) -> object:
    return curvlab.registry.create("reducers", "torch_distributed", **kwargs)


def scenario_equivalence(world: int, rank: int) -> dict:
    """(a) half of every batch per rank, DDP with the exact loss scaling, both models."""
    return {
        name: train(name, world=world, rank=rank, reducer=_reducer(), ddp=True)
        for name in ("mlp", "cnn")
    }


class _CollectiveCounter:
    """Counts ``torch.distributed`` collectives issued while ``active`` (inside ``step()``)."""

    NAMES = (
        "all_reduce",
        "all_reduce_coalesced",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "reduce_scatter_tensor",
    )

    def __init__(self) -> None:
        self.active = False
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self) -> _CollectiveCounter:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):  # noqa: ANN002, ANN003
                if self.active:
                    self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def scenario_collectives(world: int, rank: int) -> dict:
    """(b) collectives per step() for the MLP (5 captured layers = 10 statistics)."""
    out = {}
    variants = {
        "one_bucket": dict(),
        "small_buckets": dict(bucket_size_mb=200 / 2**20),  # ≈ 200 bytes per bucket
        "local_flag": dict(finite_flag="local"),
    }
    for label, kwargs in variants.items():
        reducer = _reducer(**kwargs)
        per_step: list[list[str]] = []
        with _CollectiveCounter() as counter:

            def step_hook(
                step: int, do_step: Callable[[], None], per_step: list = per_step
            ) -> None:
                counter.calls = []
                counter.active = True
                try:
                    do_step()
                finally:
                    counter.active = False
                per_step.append(list(counter.calls))

            result = train(
                "mlp",
                world=world,
                rank=rank,
                reducer=reducer,
                ddp=True,
                curvature_interval=2,
                step_hook=step_hook,
                steps=4,
            )
        out[label] = {
            "per_step": per_step,
            "buckets": len(reducer.last_bucket_bytes),
            "bucket_bytes": reducer.last_bucket_bytes,
            "reducer_collectives": reducer.collectives,
            "params": result["params"],
        }
    # one collective for statistics *and* flag (the combined path, called directly)
    reducer = _reducer()
    totals = [
        torch.full((5,), float(rank + 1), dtype=torch.float64),
        torch.full((3, 3), 2.0 * (rank + 1), dtype=torch.float64),
    ]
    with _CollectiveCounter() as counter:
        counter.active = True
        summed, counts, ok = reducer.reduce_with_flag(
            totals, [rank + 1, 2 * rank + 1], torch.tensor(rank == 0)
        )
        counter.active = False
    out["combined"] = {"calls": counter.calls, "totals": summed, "counts": counts, "ok": ok}
    return out


def scenario_nan(world: int, rank: int) -> dict:
    """(c) a NaN at step 3 on rank 1 only: in its input batch (reaches gradients and statistics
    through the sums) or in its gradient after DDP's reduction (only the finite-flag collective
    sees it); with finite_flag='local' the ranks must diverge (negative control)."""
    out = {}
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("curvlab.plugins.reducers.torch_distributed")
    handler = _Keep()
    log.addHandler(handler)
    try:

        def poison_grad(step: int, model: nn.Module) -> None:
            if step == 3 and rank == 1:
                model[0].weight.grad[0, 0] = float("nan")

        for label, kwargs, hook in (
            ("grad", {}, poison_grad),
            ("grad_local_flag", {"finite_flag": "local"}, poison_grad),
        ):
            records.clear()
            res = train(
                "mlp",
                world=world,
                rank=rank,
                reducer=_reducer(**kwargs),
                ddp=True,
                before_step=hook,
            )
            res["logged"] = [r.getMessage() for r in records]
            out[label] = res

        # NaN in rank 1's data at step 3: reaches the summed gradients and statistics
        records.clear()
        res = train(
            "mlp", world=world, rank=rank, reducer=_reducer(), ddp=True, poison_input=(3, 1)
        )
        res["logged"] = [r.getMessage() for r in records]
        out["input"] = res
    finally:
        log.removeHandler(handler)
    return out


def scenario_accumulation(world: int, rank: int) -> dict:
    """(d) 3 micro-batches per rank per step under no_sync(), uneven micro-batch sizes."""
    return {
        name: train(
            name,
            world=world,
            rank=rank,
            reducer=_reducer(),
            ddp=True,
            sizes=[10] * STEPS,
            micro_batches=3,
        )
        for name in ("mlp", "cnn")
    }


UNEQUAL_SIZES = [8] * 9 + [5]
UNEQUAL_SPLITS = [[4, 4]] * 9 + [[4, 1]]


def scenario_unequal(world: int, rank: int) -> dict:
    """(e) the last batch has 5 rows: 4 on rank 0, 1 on rank 1 (weighted by sample count);
    also a 3:5 split on every step."""
    return {
        "last": train(
            "mlp",
            world=world,
            rank=rank,
            reducer=_reducer(),
            ddp=True,
            sizes=UNEQUAL_SIZES,
            splits=UNEQUAL_SPLITS,
        ),
        "every": train(
            "mlp", world=world, rank=rank, reducer=_reducer(), ddp=True, splits=[[3, 5]] * STEPS
        ),
    }


def scenario_structures(world: int, rank: int) -> dict:
    """Any list of tensors: mixed shapes and dtypes, symmetric packing, async launch."""
    g = torch.Generator().manual_seed(7 + rank)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    totals = [
        torch.randn(7, generator=g, dtype=torch.float64),  # diagonal
        a @ a.T,  # full (symmetric)
        torch.randn(2, 4, 4, generator=g, dtype=torch.float64),  # grouped / not symmetric
        torch.randn(6, 3, generator=g, dtype=torch.float32),  # banded storage, fp32
        torch.randn(4, generator=g).to(torch.bfloat16),  # sent as fp32
    ]
    counts = [3 + rank, 4 + rank, 5, torch.tensor(6 + rank), 5000 + rank]
    out = {"inputs": totals, "counts_in": [int(c) for c in counts]}
    plain = _reducer()
    out["plain"] = plain.reduce(totals, counts)
    out["plain_collectives"] = plain.collectives
    sym = [totals[0], totals[1]]
    packed = _reducer(pack_symmetric=True)
    out["packed"] = packed.reduce(sym, counts[:2])
    out["packed_bytes"] = packed.bytes_reduced
    unpacked = _reducer()
    unpacked.reduce(sym, counts[:2])
    out["unpacked_bytes"] = unpacked.bytes_reduced
    pending = _reducer().launch(totals, counts)
    out["async"] = pending.wait()[:2]
    # a layout mismatch is an error with validate=True, not a hang
    bad = totals[:2] if rank == 0 else totals[:3]
    try:
        _reducer(validate=True).reduce(bad, counts[: len(bad)])
        out["validate_error"] = None
    except RuntimeError as err:
        out["validate_error"] = str(err)
    return out


#: (estimator, loss convention) pairs that reproduce one process exactly (docs/distributed.md):
#: statistics of the raw output gradient need the global loss scaling; ``per_sample=True``
#: rescales by the *local* batch size and so needs plain DDP's local-mean loss.
ESTIMATOR_CASES = {
    "full_global": (("full", {"per_sample": False}), "global"),
    "full_per_sample_ddp_mean": (("full", {"per_sample": True}), "ddp_mean"),
    "banded3_global": (("banded", {"bandwidth": 3}), "global"),
}


def scenario_estimators(world: int, rank: int) -> dict:
    """(a) with the full and banded estimators (matrices and band storage in the buffer)."""
    missing = [n for n in ("full", "banded") if n not in curvlab.registry.registered("estimators")]
    if missing:
        return {"skipped": f"estimators not registered: {missing}"}
    out = {}
    for label, (estimator, convention) in ESTIMATOR_CASES.items():
        for name in ("mlp", "cnn"):
            out[label, name] = train(
                name,
                world=world,
                rank=rank,
                reducer=_reducer(),
                ddp=True,
                estimator=estimator,
                loss_convention=convention,
            )
    return out


# -- overlap_backward: statistics all-reduced during the backward pass -----------------------------
class Reuse(nn.Module):
    """A layer used twice in one forward, a third use whose output gets no gradient, an
    auxiliary head that only some steps' losses reach, and forwards under no_grad and in
    eval mode between the forward and its backward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, use_aux: bool) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        self.shared(h)  # captured, but the loss does not reach it
        h = torch.tanh(self.shared(h))
        out = self.head(h)
        aux = self.aux(h)  # captured on every step, backpropagated on even steps only
        return out + aux.sum(dim=1, keepdim=True) if use_aux else out


def train_reuse(
    *, world: int = 1, rank: int = 0, reducer: object = "none", split_forwards: bool = False
) -> dict:
    """AdaFisher on :class:`Reuse`, curvature every 2nd step, gradients summed across ranks by
    hand (global loss), 2 micro-batches per step. ``split_forwards``: both micro-batches'
    forwards first, then both backwards (pending outputs of two graphs at once)."""
    torch.manual_seed(1234)
    model = Reuse().double()
    opt = curvlab.AdaFisher(model, lr=LR, curvature_interval=2, reducer=reducer)
    sizes = [8] * 7 + [5]
    splits = [[4, 4]] * 7 + [[4, 1]]
    for step, (x, y) in enumerate(make_batches("mlp", sizes)):
        n = x.shape[0]
        if world > 1:
            rows = rank_rows(n, world, rank, splits[step])
            x, y = x[rows], y[rows]
        opt.zero_grad()
        losses = []
        for xm, ym in zip(x.tensor_split(2), y.tensor_split(2), strict=True):
            with torch.no_grad():
                model(xm, True)
            model.eval()
            model(xm, True)  # eval mode: not captured
            model.train()
            loss = F.cross_entropy(model(xm, step % 4 == 0), ym, reduction="sum") / n
            if split_forwards:
                losses.append(loss)
            else:
                loss.backward()
        for loss in losses:
            loss.backward()
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:  # the same on every rank (aux: even steps only)
                    dist.all_reduce(p.grad)
        opt.step()
    overlap = getattr(opt.reducer, "overlap", None)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "metrics": opt.metrics(),
        "launches": None
        if overlap is None
        else (overlap.launched_in_backward, overlap.launched_at_end),
    }


#: overlap_backward runs: key → (train() arguments, the scenario and key of the same run with
#: the statistics reduced in step(), computed by the other scenarios of this worker)
OVERLAP_RUNS = {
    ("ddp", "mlp"): (dict(), ("equivalence", "mlp")),
    ("ddp", "cnn"): (dict(), ("equivalence", "cnn")),
    ("accumulation", "mlp"): (
        dict(sizes=[10] * STEPS, micro_batches=3),
        ("accumulation", "mlp"),
    ),
    ("accumulation", "cnn"): (
        dict(sizes=[10] * STEPS, micro_batches=3),
        ("accumulation", "cnn"),
    ),
    ("unequal", "mlp"): (dict(sizes=UNEQUAL_SIZES, splits=UNEQUAL_SPLITS), ("unequal", "last")),
    ("full", "mlp"): (
        dict(estimator=("full", {"per_sample": False})),
        ("estimators", ("full_global", "mlp")),
    ),
    ("nan", "mlp"): (dict(poison_input=(3, 1)), ("nan", "input")),
}


def scenario_overlap(world: int, rank: int) -> dict:
    """The runs of :data:`OVERLAP_RUNS` with ``overlap_backward=True`` and tiny buckets (one
    launch per completed layer); the reuse model with and without it."""
    tiny = 1e-9  # MiB: every layer is its own bucket

    def launches(reducer: object) -> tuple[int, int]:
        return reducer.overlap.launched_in_backward, reducer.overlap.launched_at_end

    out = {}
    for (label, name), (kwargs, _) in OVERLAP_RUNS.items():
        reducer = _reducer(overlap_backward=True, bucket_size_mb=tiny)
        result = train(name, world=world, rank=rank, ddp=True, reducer=reducer, **kwargs)
        out[label, name] = {"on": result, "launches": launches(reducer)}
    for split_forwards in (False, True):
        reducer = _reducer(overlap_backward=True, bucket_size_mb=tiny)
        common = dict(world=world, rank=rank, split_forwards=split_forwards)
        out["reuse", split_forwards] = {
            "off": train_reuse(reducer=_reducer(), **common),
            "on": train_reuse(reducer=reducer, **common),
            "launches": launches(reducer),
        }
    # the default bucket (4 MiB): everything of these small models in one launch per backward
    default = _reducer(overlap_backward=True)
    out["default_bucket"] = train("mlp", world=world, rank=rank, ddp=True, reducer=default)
    out["default_bucket"]["launches"] = launches(default)
    return out


SCENARIOS = {
    "equivalence": scenario_equivalence,
    "estimators": scenario_estimators,
    "collectives": scenario_collectives,
    "nan": scenario_nan,
    "accumulation": scenario_accumulation,
    "unequal": scenario_unequal,
    "structures": scenario_structures,
    "overlap": scenario_overlap,
}


def main(argv: list[str]) -> int:
    out_dir, names = argv[0], argv[1:] or list(SCENARIOS)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    results: dict = {"seconds": {}}
    try:
        for name in names:
            start = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](world, rank)
            except Exception:  # noqa: BLE001 - reported by the test
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
            results["seconds"][name] = time.perf_counter() - start
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
