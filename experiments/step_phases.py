"""Step time by phase of an interval optimizer: steps without curvature, curvature steps, and
steps that also refresh the inverses, for several optimizers one step each in turn.

``python -m curvlab.experiments.step_phases --model resnet18_b16 --steps 110 --out phases.json``
builds ``curvlab bench``'s workload and one model copy per optimizer (``--optimizers``, bench
names; default curvlab's K-FAC and ASDL's at curvature 10 / inverse 100) and runs step i of
every optimizer before step i + 1 of any, so that the machine's drift falls on all of them
alike. A step's phase follows from its index (``i % curvature == 0``: curvature;
``i % inverse == 0``: refresh too; step 0 is the first refresh). The JSON holds per optimizer
and phase the median and the count (ms), the per-step times, and the period mean estimated
from the medians, ``(plain · (k − k/c) + curvature · (k/c − 1) + refresh) / k`` for curvature
every c and inverses every k steps. ``curvlab bench`` times whole periods instead; this
says where a difference between two optimizers comes from (docs/results/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from curvlab.experiments import bench
from curvlab.experiments.bench_baselines import CURVATURE_INTERVAL, INVERSE_INTERVAL

DEFAULT_OPTIMIZERS = ("kfac_c10_i100", "asdl_kfac")


def phase_of(step: int, curvature: int, inverse: int) -> str:
    if step % inverse == 0:
        return "refresh"
    return "curvature" if step % curvature == 0 else "plain"


def run(
    model: str,
    optimizers: list[str],
    steps: int,
    size: str = "cpu",
    curvature: int = CURVATURE_INTERVAL,
    inverse: int = INVERSE_INTERVAL,
) -> dict:
    workload = bench.WORKLOADS[model][size]()
    x, y = workload.batch(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    template = workload.build()
    runners = [
        bench.build_runner(name, template, torch.device("cpu"), x, y, workload.loss)[0]
        for name in optimizers
    ]
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for runner in runners:
            start = time.perf_counter_ns()
            runner.step()
            times[runner.name].append((time.perf_counter_ns() - start) / 1e6)
    out: dict = {"model": model, "size": size, "steps": steps, "threads": torch.get_num_threads()}
    out["git"], out["load_average"] = bench.git_state(), bench.load_average()
    out["curvature_interval"], out["inverse_interval"] = curvature, inverse
    out["optimizers"] = {}
    for name, series in times.items():
        phases: dict[str, list[float]] = {}
        for i, t in enumerate(series):
            phases.setdefault(phase_of(i, curvature, inverse), []).append(t)
        medians = {p: statistics.median(v) for p, v in phases.items()}
        entry = {
            "median_ms": medians,
            "count": {p: len(v) for p, v in phases.items()},
            "times_ms": series,
        }
        if set(medians) == {"plain", "curvature", "refresh"}:
            per_period = inverse // curvature
            entry["period_mean_ms"] = (
                medians["plain"] * (inverse - per_period)
                + medians["curvature"] * (per_period - 1)
                + medians["refresh"]
            ) / inverse
        out["optimizers"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_b16", choices=sorted(bench.WORKLOADS))
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=INVERSE_INTERVAL + 10)
    parser.add_argument("--size", default="cpu", choices=("cpu", "quick"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.optimizers.split(",") if n]
    unknown = [n for n in names if n not in bench.OPTIMIZERS]
    if unknown:
        print(
            f"step_phases: unknown optimizer {unknown[0]!r}; choose from "
            f"{', '.join(sorted(bench.OPTIMIZERS))}",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1:
        print(f"step_phases: --steps must be ≥ 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, names, args.steps, args.size)
    for name, entry in result["optimizers"].items():
        medians = ", ".join(f"{p} {v:.1f}" for p, v in entry["median_ms"].items())
        period = entry.get("period_mean_ms")
        print(f"{name}: {medians} ms" + (f"; period mean {period:.1f} ms" if period else ""))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
