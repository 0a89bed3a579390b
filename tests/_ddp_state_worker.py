"""Worker of ``test_portable_state.py``: ``python -m tests._ddp_state_worker OUT`` per rank.

Trains ``AdaFisher(DDP(model))`` on 2 gloo ranks, each on its half of every batch; rank 0 saves
the plain model's and the optimizer's state after 3 steps (``OUT/state.pt``) and the parameters
after 5 (``OUT/final.pt``).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import curvlab


def make_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)
    ]


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    # each rank's loss is the mean over its own rows (plain DDP): the reducer's "local_mean"
    opt = curvlab.AdaFisher(
        ddp,
        lr=1e-2,
        reducer=curvlab.registry.create(
            "reducers", "torch_distributed", loss_convention="local_mean"
        ),
    )
    for i, (x, y) in enumerate(batches()):
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        F.cross_entropy(ddp(x[rows]), y[rows]).backward()
        opt.step()
        if i == 2 and rank == 0:
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "state.pt"
            )
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out / "final.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
