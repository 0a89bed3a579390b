"""Worker for the FSDP2 tests: ``python -m tests._fsdp_worker OUT``.

Started once per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them) by
``tests/test_fsdp.py``; joins a gloo group on 127.0.0.1, runs every scenario of
:data:`SCENARIOS`, saves ``OUT/rank{r}.pt`` and destroys the group. An exception in a scenario
is recorded in its result instead of ending the worker.

The same :func:`train` function computes the single-process reference (``world=1``: the plain
model, mean loss over the whole batch) in the test process. On ``world`` ranks every rank takes
its rows of each batch and its local mean loss; FSDP2 averages the gradients (reduce-scatter
mean) and the reducer's ``loss_convention="local_mean"`` puts the output statistics in the
units of the global loss (docs/distributed.md), so both sides compute the same numbers.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

import curvlab
from curvlab import distributed_checkpoint

STEPS = 5
N_GLOBAL = 8
LR = 1e-2


# -- models and data (float64, deterministic) ------------------------------------------------------
def make_model(name: str) -> nn.Module:
    """Layers whose output dimension (dim 0 of the weight) is odd, so 2 ranks hold unequal rows."""
    torch.manual_seed(1234)
    if name == "mlp":  # LayerNorm and the last Linear are left to the root's FSDP group
        model = nn.Sequential(
            nn.Linear(6, 7),
            nn.LayerNorm(7),
            nn.Tanh(),
            nn.Linear(7, 5),
            nn.Tanh(),
            nn.Linear(5, 3),
        )
    elif name == "linear_mlp":  # the official code's statistics of LayerNorm are not row sums
        model = nn.Sequential(
            nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)
        )
    elif name == "cnn":  # the grouped conv's 6 output channels: rank 0 holds 1½ of its 3 groups
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 3),
        )
    elif name == "narrow_mlp":  # Linear(7, 1): rank 1 holds no row of its weight and bias
        model = nn.Sequential(
            nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1), nn.Tanh(), nn.Linear(1, 3)
        )
    elif name == "scaled_mlp":  # a parameter without an adapter (fallback), 7 rows
        model = nn.Sequential(nn.Linear(6, 7), Scale(7), nn.Tanh(), nn.Linear(7, 3))
    else:
        raise ValueError(name)
    return model.double()


class Scale(nn.Module):
    """``x * w``: a parameter that no adapter pairs with a layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


#: submodules passed to fully_shard before the root (the others stay in the root's group)
SHARDED = {
    "mlp": (0, 3),
    "linear_mlp": (0, 2),
    "cnn": (0, 2),
    "scaled_mlp": (1,),
    "narrow_mlp": (2,),
}


def shard(model: nn.Module, name: str, **kwargs: object) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for index in SHARDED[name]:
        fully_shard(model[index], **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_batches(name: str, steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(99)
    shape = (2, 8, 8) if name == "cnn" else (6,)
    return [
        (
            torch.randn(N_GLOBAL, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (N_GLOBAL,), generator=g),
        )
        for _ in range(steps)
    ]


#: (optimizer class name, model, keyword arguments)
CASES = {
    "paper_mlp": ("AdaFisher", "mlp", {}),
    "paper_cnn": ("AdaFisher", "cnn", {}),
    "official": ("AdaFisher", "linear_mlp", {"variant": "official", "curvature_interval": 2}),
    "adafisherw": ("AdaFisherW", "mlp", {"weight_decay": 0.1, "curvature_interval": 2}),
    # Adam as curvlab parts (configs/adam.gin): an elementwise curvature per shard
    "adam": (
        "CurvatureOptimizer",
        "mlp",
        {
            "estimator": "squared_gradient",
            "normalizer": "identity",
            "gamma": 0.999,
            "ema_bias_correction": True,
            "damping": "adam_epsilon",
            "update_rule": "adam_update",
        },
    ),
    # K-FAC as configs/kfac.gin (per-sample G, factored damping: inverses, KL clip)
    "kfac": (
        "CurvatureOptimizer",
        "mlp",
        {
            "estimator": ("full", {"per_sample": True}),
            "normalizer": "identity",
            "gamma": 0.95,
            "damping": ("factored", {"value": 1e-3}),
            "update_rule": ("kfac", {"kl_clip": 1e-3}),
            "inverse_interval": 2,
            "loss_convention": "global",  # per_sample=True rescales g by the local batch
        },
    ),
    # shards without rows (a 1-row weight on 2 ranks), diagonal and Kronecker-solved
    "empty_shard_paper": ("AdaFisher", "narrow_mlp", {}),
    "empty_shard_kfac": ("AdaFisher", "narrow_mlp", {"estimator": ("full", {"per_sample": False})}),
    # banded AdaFisher, eigenbasis solve on a grouped conv and on Linear layers
    "banded": ("AdaFisher", "cnn", {"estimator": ("banded", {"bandwidth": 3})}),
    # the squared-gradient fallback normalises over the whole (gathered) parameter
    "fallback": (
        "AdaFisher",
        "scaled_mlp",
        {"fallback": "squared_gradient", "warn_on_fallback": False},
    ),
}


def make_optimizer(
    case: str, model: nn.Module, world: int, split: bool = False, overlap: bool = False
) -> curvlab.CurvatureOptimizer:
    cls, _, kwargs = CASES[case]
    kwargs = dict(kwargs)
    convention = kwargs.pop("loss_convention", "local_mean")
    for kind, key in (
        ("estimators", "estimator"),
        ("damping", "damping"),
        ("updates", "update_rule"),
    ):
        if isinstance(kwargs.get(key), tuple):
            name, arguments = kwargs[key]
            kwargs[key] = curvlab.registry.create(kind, name, **arguments)
    if kwargs.get("damping") == "adam_epsilon":
        kwargs["damping"] = curvlab.registry.create(
            "damping", "constant", value=1e-8, mode="after_root"
        )
    if kwargs.get("update_rule") == "adam_update":
        kwargs["update_rule"] = curvlab.registry.create("updates", "adafisher", power=0.5)
    reducer: object = "none"
    if world > 1:
        reducer = curvlab.registry.create(
            "reducers",
            "torch_distributed",
            loss_convention=convention,
            split_inverses=split,
            overlap_backward=overlap,
            # overlap: one bucket per layer, launched as soon as the layer completes
            bucket_size_mb=1e-9 if overlap else None,
        )
    return getattr(curvlab, cls)(model, lr=LR, reducer=reducer, **kwargs)


def curvature(opt: curvlab.CurvatureOptimizer) -> dict[str, Tensor]:
    """Every factor tensor, by layer and key."""
    layers = opt.state_dict()["curvature"]["layers"]
    return {f"{name}.{k}": v for name, state in layers.items() for k, v in state.items()}


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective), a copy of anything else."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def train(
    case: str,
    *,
    world: int = 1,
    rank: int = 0,
    steps: int = STEPS,
    mp_dtype: torch.dtype | None = None,
    dtype: torch.dtype = torch.float64,
    poison: tuple[int, int] | None = None,
    save: tuple[int, str] | None = None,
    resume: str | None = None,
    split: bool = False,
    overlap: bool = False,
    micro_batches: int = 1,
) -> dict:
    """``steps`` optimizer steps; the final parameters (whole), metrics and local shapes.

    ``world == 1``: the plain model on the whole batch. ``mp_dtype``: FSDP2's
    ``MixedPrecisionPolicy(param_dtype=mp_dtype)`` over master weights of ``dtype``.
    ``poison = (step, rank)``: a NaN in that rank's input at that step. ``save = (k, path)``:
    a DCP checkpoint after ``k`` steps (the run goes on); ``resume``: start from a checkpoint
    (at the step it was saved). ``split``: the reducer's KAISA split of the banded/full
    refresh; the layers this rank refreshed are returned as ``refreshed``. ``overlap``: the
    reducer's ``overlap_backward`` (launches during backward counted in ``launches``).
    ``micro_batches``: the rank's rows in that many accumulated backward passes (each loss
    scaled by its share of the rows, so the sum is the rank's mean loss).
    """
    _, model_name, _ = CASES[case]
    model = make_model(model_name).to(dtype)
    if world > 1:
        kwargs = {}
        if mp_dtype is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype)
        shard(model, model_name, **kwargs)
    opt = make_optimizer(case, model, world, split, overlap)
    refreshed: list[list[str]] = []
    solver_refresh = opt.kronecker_solver.refresh

    def recording_refresh(items, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        refreshed.append([item.name for item in items])
        return solver_refresh(items, *args, **kwargs)

    opt.kronecker_solver.refresh = recording_refresh
    if resume is not None:
        distributed_checkpoint.load(resume, model, opt)
    start = opt.metrics()["steps"]
    factors = curvature(opt) if resume is not None else None
    workspace = []  # reused buffers after each step: constant (no buffer per step)
    for step, (x, y) in enumerate(make_batches(model_name, steps)):
        if step < start:
            continue
        if save is not None and step == save[0]:
            distributed_checkpoint.save(save[1], model, opt)
            factors = curvature(opt)
        rows = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
        x, y = x[rows], y[rows]
        if poison == (step, rank):
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad()
        for xm, ym in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
            loss = F.cross_entropy(model(xm.to(dtype)).to(torch.float64), ym)
            (loss * (xm.shape[0] / x.shape[0])).backward()
        opt.step()
        workspace.append(len(opt._workspace._buffers))
    return {
        "params": [full(p) for p in model.parameters()],
        "local_rows": [
            p.to_local().shape[0] if world > 1 else p.shape[0] for p in model.parameters()
        ],
        "metrics": opt.metrics(),
        "factors": factors,  # at the checkpoint (saved or loaded)
        "refreshed": refreshed,
        "workspace": workspace,
        "factor_dtypes": sorted(
            {
                str(v.dtype)
                for s in opt.curvature_state.values()
                for v in s.values()
                if v.is_floating_point()
            }
        ),
        "state_types": sorted({type(v).__name__ for s in opt.state.values() for v in s.values()}),
        "launches": None
        if getattr(opt.reducer, "overlap", None) is None
        else (opt.reducer.overlap.launched_in_backward, opt.reducer.overlap.launched_at_end),
    }


# -- scenarios (run on every rank) -----------------------------------------------------------------
def scenario_equivalence(world: int, rank: int) -> dict:
    return {case: train(case, world=world, rank=rank) for case in CASES}


def scenario_mixed_precision(world: int, rank: int) -> dict:
    return {
        "fp32_over_fp64": train("paper_mlp", world=world, rank=rank, mp_dtype=torch.float32),
        "bf16_over_fp32": train(
            "paper_mlp", world=world, rank=rank, mp_dtype=torch.bfloat16, dtype=torch.float32
        ),
    }


def scenario_nan(world: int, rank: int) -> dict:
    return train("paper_mlp", world=world, rank=rank, poison=(2, 1))


def scenario_no_reducer(world: int, rank: int) -> dict:
    model = shard(make_model("mlp"), "mlp")
    opt = curvlab.AdaFisher(model, lr=LR)
    x, y = make_batches("mlp", 1)[0]
    F.cross_entropy(model(x), y).backward()
    try:
        opt.step()
    except ValueError as err:
        return {"message": str(err)}
    return {"message": None}


#: cases saved and resumed: the paper's diagonal factors; K-FAC's factors and inverses
CHECKPOINT_CASES = ("paper_mlp", "kfac")
#: where the test process (one process) wrote its checkpoints, one folder per case (1 → 2)
CHECKPOINT_IN = ""
#: where the ranks write theirs (2 → 1)
CHECKPOINT_OUT = ""
CHECKPOINT_STEP, CHECKPOINT_STEPS = 3, 6


def scenario_checkpoint(world: int, rank: int) -> dict:
    """Per case: save after 3 of 6 steps and go on (the uninterrupted run); resume the test
    process's one-process checkpoint on these ranks."""
    out = {}
    for case in CHECKPOINT_CASES:
        saved = train(
            case,
            world=world,
            rank=rank,
            steps=CHECKPOINT_STEPS,
            save=(CHECKPOINT_STEP, os.path.join(CHECKPOINT_OUT, case)),
        )
        resumed = train(
            case,
            world=world,
            rank=rank,
            steps=CHECKPOINT_STEPS,
            resume=os.path.join(CHECKPOINT_IN, case),
        )
        out[case] = {"saved": saved, "resumed": resumed}
    return out


#: KAISA split of the refresh: K-FAC (inverses), banded (eigenbasis), full with λ after the
#: product (eigenbasis); models with layers of several sizes
SPLIT_CASES = ("kfac", "banded", "empty_shard_kfac")


def scenario_split(world: int, rank: int) -> dict:
    return {case: train(case, world=world, rank=rank, split=True) for case in SPLIT_CASES}


def scenario_plain_state(world: int, rank: int) -> dict:
    """``opt.state_dict()`` of one process (3 steps on the whole batch, computed on every rank)
    loaded into the sharded model's optimizer with ``load_state_dict``; 3 more steps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    plain = make_model("mlp")
    plain_opt = make_optimizer("paper_mlp", plain, 1)
    batches = make_batches("mlp", 6)
    for x, y in batches[:3]:
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    model = shard(make_model("mlp"), "mlp")
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt = make_optimizer("paper_mlp", model, world)
    opt.load_state_dict(plain_opt.state_dict())
    state_types = sorted({type(v).__name__ for s in opt.state.values() for v in s.values()})
    rows = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    for x, y in batches[3:]:
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return {"params": [full(p) for p in model.parameters()], "state_types": state_types}


#: overlap_backward under FSDP2: case → micro-batches (accumulated backward passes; K-FAC's
#: per-sample statistics scale g by each call's batch size, so it is not accumulated)
OVERLAP_CASES = {"paper_mlp": 2, "banded": 2, "official": 2, "kfac": 1}


def scenario_overlap(world: int, rank: int) -> dict:
    return {
        case: train(case, world=world, rank=rank, overlap=True, micro_batches=micro)
        for case, micro in OVERLAP_CASES.items()
    }


#: on 4 ranks (tests/test_fsdp.py, a run of its own): AdaFisher and K-FAC, the first with the
#: statistics reduced during backward
FOUR_RANK_CASES = ("paper_mlp", "kfac")


def scenario_four_ranks(world: int, rank: int) -> dict:
    out = {case: train(case, world=world, rank=rank) for case in FOUR_RANK_CASES}
    out["paper_mlp_overlap"] = train("paper_mlp", world=world, rank=rank, overlap=True)
    return out


def scenario_sharded_solve(world: int, rank: int) -> dict:
    """K-FAC with the sharded solve (the default) and with gathered gradients, counting the
    row solves (the sharded path taken)."""
    from curvlab import sharding
    from curvlab.kronecker_inverse import InverseOperator

    calls = {"n": 0}
    original = InverseOperator.solve_rows

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    InverseOperator.solve_rows = counting
    out = {}
    try:
        for flag in (True, False):
            sharding.SHARDED_SOLVE, calls["n"] = flag, 0
            result = train("kfac", world=world, rank=rank)
            result["row_solves"] = calls["n"]
            out["sharded" if flag else "gathered"] = result
    finally:
        InverseOperator.solve_rows = original
        sharding.SHARDED_SOLVE = True
    return out


SCENARIOS = {
    "equivalence": scenario_equivalence,
    "sharded_solve": scenario_sharded_solve,
    "mixed_precision": scenario_mixed_precision,
    "nan": scenario_nan,
    "no_reducer": scenario_no_reducer,
    "checkpoint": scenario_checkpoint,
    "split": scenario_split,
    "plain_state": scenario_plain_state,
    "overlap": scenario_overlap,
}
#: run only when named on the command line
EXTRA_SCENARIOS = {"four_ranks": scenario_four_ranks}


def main(out: str, checkpoint_in: str, names: str = "") -> None:
    global CHECKPOINT_IN, CHECKPOINT_OUT
    CHECKPOINT_IN, CHECKPOINT_OUT = checkpoint_in, os.path.join(out, "checkpoint")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    results = {}
    try:
        chosen = names.split(",") if names else list(SCENARIOS)
        for name in chosen:
            fn = {**SCENARIOS, **EXTRA_SCENARIOS}[name]
            try:
                results[name] = fn(world, rank)
            except Exception:  # recorded; the test reports it
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
