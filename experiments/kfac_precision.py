"""fp32 against float64 for K-FAC's inverse solve, on the benchmark's models (issue 17).

Trains ``configs/kfac.gin`` for a few steps on a benchmark workload (``curvlab bench``'s CPU
sizes, synthetic batch), then, for every full layer, inverts the damped factors
``H' + π√λ I`` and ``S' + √λ/π I`` in fp32 and in float64 and reports their condition
numbers, whether the fp32 Cholesky factorisation failed, the relative error of the fp32 solve
``S⁻¹ ∇W H⁻¹`` of the layer's gradient against float64, and the precision the inverse solver
chooses for it (:class:`curvlab.kronecker_inverse.InverseSolver`)::

    python -m curvlab.experiments.kfac_precision --models mlp,resnet18_b16 --steps 3 \\
        --out docs/results/kfac_precision.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from curvlab.config import CONFIG_ROOT, build_optimizer
from curvlab.kronecker import split_pi
from curvlab.kronecker_inverse import KAPPA_FP32, InverseSolver
from curvlab.structures import dense_factor


def _inverse(M: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    L, info = torch.linalg.cholesky_ex(M.to(dtype))
    return torch.cholesky_inverse(L), bool((info > 0).any())


def measure(model_name: str, steps: int, size: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The per-layer report of one workload after ``steps`` K-FAC steps."""
    from curvlab.experiments.bench import WORKLOADS

    work = WORKLOADS[model_name][size]()
    torch.manual_seed(seed)
    model = work.build()
    x, y = work.batch(torch.Generator().manual_seed(seed))
    opt = build_optimizer(model, CONFIG_ROOT / "kfac.gin")
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        work.loss(model(x), y).backward()
        opt.step()
    root = math.sqrt(opt.damping.value(opt.metrics()["steps"]))
    layers = []
    for record in opt.layers:
        state = opt.curvature_state.get(record.name)
        if record.structure != "full" or state is None:
            continue
        H, S = (dense_factor("full", state[k]) for k in ("H", "S"))
        pi = split_pi(H.diagonal(dim1=-2, dim2=-1), S.diagonal(dim1=-2, dim2=-1))
        damped = {
            "H": H + pi * root * torch.eye(H.shape[-1]),
            "S": S + root / pi * torch.eye(S.shape[-1]),
        }
        grads = {role: p.grad for role, p in record.params.items()}
        V = record.adapter.to_matrix(record.module, grads).double()
        solved, failed = {}, {}
        for dtype in (torch.float32, torch.float64):
            H_inv, fail_h = _inverse(damped["H"], dtype)
            S_inv, fail_s = _inverse(damped["S"], dtype)
            solved[dtype] = S_inv.double() @ V @ H_inv.double()
            failed[dtype] = fail_h or fail_s
        reference = solved[torch.float64]
        error = float((solved[torch.float32] - reference).norm() / reference.norm())
        kappa = {}
        for key, M in damped.items():
            values = torch.linalg.eigvalsh(M.double())
            kappa[key] = float((values.max() / values.min()).max())
        shift = {"H": (pi * root).reshape(1), "S": (root / pi).reshape(1)}
        chooses_fp32 = not failed[torch.float32] and all(
            InverseSolver._well_conditioned(M.unsqueeze(0), shift[k]) for k, M in damped.items()
        )
        layers.append(
            {
                "layer": record.name,
                "d_in": H.shape[-1],
                "d_out": S.shape[-1],
                "kappa_H": kappa["H"],
                "kappa_S": kappa["S"],
                "fp32_cholesky_failed": failed[torch.float32],
                "fp32_relative_error": error,
                "solver_precision": "float32" if chooses_fp32 else "float64",
            }
        )
    return {
        "model": model_name,
        "description": work.description,
        "steps": steps,
        "layers": layers,
        "worst_fp32_relative_error": max(entry["fp32_relative_error"] for entry in layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet18_b16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", default="cpu", choices=("cpu", "quick"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {
        "kappa_fp32_threshold": KAPPA_FP32,
        "config": "configs/kfac.gin",
        "results": [measure(m, args.steps, args.size) for m in args.models.split(",")],
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for result in report["results"]:
        print(
            f"{result['description']}: worst fp32 error {result['worst_fp32_relative_error']:.2e}"
        )
        for e in result["layers"]:
            print(
                f"  {e['layer']:24s} κ_H {e['kappa_H']:9.3g} κ_S {e['kappa_S']:9.3g} "
                f"fp32 error {e['fp32_relative_error']:9.2e} → {e['solver_precision']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
