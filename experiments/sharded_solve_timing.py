"""K-FAC's step on an FSDP2-sharded MLP: the sharded solve against gathered gradients.

``python -m curvlab.experiments.sharded_solve_timing --out sharded_solve.json`` starts
``--world`` gloo ranks itself (one thread each). Two copies of the same model and K-FAC optimizer
(``configs/kfac.gin``'s parts) train on the same batches, one with ``sharding.SHARDED_SOLVE``
(each rank multiplies its rows by ``H'⁻¹``, all-gathers that product, applies its rows of
``S'⁻¹``) and one without it (every rank gathers each gradient and solves the whole layer).
Their periods alternate so both see the same machine load. The JSON holds each variant's
median ``step()`` and iteration times (ms), their ratio, and the largest parameter difference
between the two runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import curvlab
from curvlab import sharding
from curvlab.experiments.distributed import run_timing_job


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> curvlab.CurvatureOptimizer:
    create = curvlab.registry.create
    return curvlab.CurvatureOptimizer(
        model,
        lr=1e-3,
        estimator=create("estimators", "full", per_sample=True),
        normalizer="identity",
        gamma=0.95,
        damping=create("damping", "factored", value=1e-3),
        update_rule=create("updates", "kfac", kl_clip=1e-3),
        # per-sample G rescales g by the local batch (as tests/_fsdp_worker.py's K-FAC)
        reducer=create("reducers", "torch_distributed", loss_convention="global"),
        curvature_interval=args.curvature_interval,
        inverse_interval=args.inverse_interval,
    )


def run_rank(args: argparse.Namespace) -> dict:
    from torch.distributed.fsdp import fully_shard

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    variants = {}
    for name in ("sharded", "gathered"):
        model = make_model(args.width, args.depth)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        variants[name] = (model, make_optimizer(model, args), {"iter": [], "step": []})

    def period(name: str, record: bool) -> None:
        model, opt, times = variants[name]
        sharding.SHARDED_SOLVE = name == "sharded"
        dist.barrier()
        start, stp = time.perf_counter(), 0.0
        for _ in range(args.period):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t0 = time.perf_counter()
            opt.step()
            stp += time.perf_counter() - t0
        if record:
            times["iter"].append((time.perf_counter() - start) / args.period)
            times["step"].append(stp / args.period)

    for rep in range(args.warmup + args.repeats):
        for name in variants:
            period(name, record=rep >= args.warmup)
    sharding.SHARDED_SOLVE = True
    out: dict = {}
    for name, (_, _, times) in variants.items():
        out[name] = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    out["ratio_step_sharded_gathered"] = out["sharded"]["step"] / out["gathered"]["step"]
    out["ratio_iter_sharded_gathered"] = out["sharded"]["iter"] / out["gathered"]["iter"]
    out["max_parameter_difference"] = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item()
        for a, b in zip(
            variants["sharded"][0].parameters(), variants["gathered"][0].parameters()
        )
    )
    dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sharded_solve_timing.json")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    parser.add_argument("--period", type=int, default=10, help="iterations per timed period")
    parser.add_argument("--curvature-interval", type=int, default=10)
    parser.add_argument("--inverse-interval", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    # a rank (under torchrun, or started here) writes args.out; the launcher reads it
    r = run_timing_job("curvlab.experiments.sharded_solve_timing", args, argv, run_rank)
    if r is None:
        return 0 if "RANK" in os.environ else 1
    print(
        f"step(): sharded {r['sharded']['step']:.1f} ms, gathered {r['gathered']['step']:.1f} "
        f"ms ({r['ratio_step_sharded_gathered']:.3f}); iteration {r['sharded']['iter']:.1f} / "
        f"{r['gathered']['iter']:.1f} ms; max parameter difference "
        f"{r['max_parameter_difference']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
