"""Step time with and without ``overlap_backward``, 2 gloo ranks on CPU, in one run.

``python -m curvlab.experiments.overlap_timing --out overlap.json`` starts the ranks itself
(or run it under ``torchrun --nproc_per_node=2``). Per configuration, two copies of the same
DDP model and optimizer — statistics reduced in ``step()`` (today's path) and launched during
the backward pass — train on the same batches; their curvature periods alternate (off, on,
off, on, ...) so that both see the same machine load. Each period is ``--period`` iterations
(forward, backward, ``step()``), timed as a whole, and the JSON holds per variant the median
time per iteration (``iter``), its backward and ``step()`` parts, the part of ``step()`` spent
in the reducer's statistics calls (``wait``: the reduction, or the wait for the overlapped one,
and the finite flag), and the on/off ratio of the medians (all in ms).

Configurations: K-FAC (full factors, ``configs/kfac.gin``'s parts) and AdaFisher (diagonal) on
an MLP of ``--width`` (default 512) with ``--depth`` hidden layers, fp32, ``--batch`` rows per
rank, one thread per rank.
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
from curvlab.experiments.distributed import run_timing_job

CONFIGS = ("kfac_full", "adafisher_diagonal")


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make_optimizer(config: str, model: nn.Module, overlap: bool, args: argparse.Namespace):  # noqa: ANN201
    reducer = curvlab.registry.create(
        "reducers",
        "torch_distributed",
        # per-sample K-FAC statistics are already in the global loss's units under DDP
        loss_convention="global" if config == "kfac_full" else "local_mean",
        overlap_backward=overlap,
        bucket_size_mb=args.bucket_mb if overlap else None,
    )
    if config == "kfac_full":
        create = curvlab.registry.create
        return curvlab.CurvatureOptimizer(
            model,
            lr=1e-3,
            estimator=create("estimators", "full", per_sample=True),
            normalizer="identity",
            gamma=0.95,
            damping=create("damping", "factored", value=1e-3),
            update_rule=create("updates", "kfac", kl_clip=1e-3),
            curvature_interval=args.curvature_interval,
            inverse_interval=args.inverse_interval,
            reducer=reducer,
        )
    return curvlab.AdaFisher(
        model, lr=1e-3, curvature_interval=args.curvature_interval, reducer=reducer
    )


def _time_reducer_calls(reducer: object, times: dict) -> None:
    """Add the time ``step()`` spends in the reducer's statistics calls (reduction or the wait
    for the overlapped one, and the finite flag) to ``times["_wait"]``."""
    for name in ("reduce_with_flag", "all_finite", "take_reduced"):
        original = getattr(reducer, name)

        def timed(*a, _original=original, **k):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                times["_wait"] += time.perf_counter() - start

        setattr(reducer, name, timed)


def run_rank(args: argparse.Namespace) -> dict:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    results = {}
    for config in args.configs:
        variants = {}
        for overlap in (False, True):
            model = make_model(args.width, args.depth)
            net = nn.parallel.DistributedDataParallel(model)
            opt = make_optimizer(config, model, overlap, args)
            times = {"iter": [], "bwd": [], "step": [], "wait": []}
            _time_reducer_calls(opt.reducer, times)
            variants["on" if overlap else "off"] = (net, opt, times)

        def period(net, opt, times, record: bool) -> None:  # noqa: ANN001
            dist.barrier()
            times["_wait"] = 0.0
            start = time.perf_counter()
            bwd = stp = 0.0
            for _ in range(args.period):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                t0 = time.perf_counter()
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                bwd, stp = bwd + t1 - t0, stp + t2 - t1
            total = time.perf_counter() - start
            if record:
                times["iter"].append(total / args.period)
                times["bwd"].append(bwd / args.period)
                times["step"].append(stp / args.period)
                times["wait"].append(times["_wait"] / args.period)

        for rep in range(args.warmup + args.repeats):
            for name in ("off", "on"):
                net, opt, times = variants[name]
                period(net, opt, times, record=rep >= args.warmup)
        out = {}
        for name, (_, opt, times) in variants.items():
            del times["_wait"]
            out[name] = {key: statistics.median(values) * 1e3 for key, values in times.items()} | {
                "iterations_ms": [v * 1e3 for v in times["iter"]]
            }
            overlap = opt.reducer.overlap
            if overlap is not None:
                out[name]["launches"] = [overlap.launched_in_backward, overlap.launched_at_end]
            out[name]["collectives"] = opt.reducer.collectives
            out[name]["statistics_bytes_per_update"] = opt.reducer.bytes_reduced / max(
                1, args.period * (args.warmup + args.repeats) // args.curvature_interval
            )
        out["ratio_on_off"] = out["on"]["iter"] / out["off"]["iter"]
        # the runs must agree: the same numbers (up to the order of additions)
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(
                variants["on"][0].module.parameters(), variants["off"][0].module.parameters()
            )
        )
        out["max_parameter_difference"] = diff
        results[config] = out
    dist.destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="overlap_timing.json")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128, help="rows per rank")
    parser.add_argument("--period", type=int, default=5, help="iterations per timed period")
    parser.add_argument("--curvature-interval", type=int, default=1)
    parser.add_argument("--inverse-interval", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=None, help="overlap bucket cap")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    # a rank (under torchrun, or started here) writes args.out; the launcher reads it
    data = run_timing_job("curvlab.experiments.overlap_timing", args, argv, run_rank)
    if data is None:
        return 0 if "RANK" in os.environ else 1
    for config in args.configs:
        r = data[config]
        print(
            f"{config}: off {r['off']['iter']:.1f} ms/iter (statistics in step "
            f"{r['off']['wait']:.1f}), on {r['on']['iter']:.1f} ms/iter (statistics in step "
            f"{r['on']['wait']:.1f}), "
            f"on/off {r['ratio_on_off']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
