"""Worker of tests/faults/test_distributed_faults.py: rank 1 never reaches a collective; rank 0
times each bounded wait (reducer, runner) and writes what happened to a JSON file.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.faults.stalled_rank OUT
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_S = 1.5


def timed(fn) -> dict:  # noqa: ANN001
    start = time.monotonic()
    try:
        fn()
    except RuntimeError as err:
        return {"seconds": time.monotonic() - start, "error": str(err).splitlines()[0]}
    return {"seconds": time.monotonic() - start, "error": None}


def main(out: str) -> None:
    # the group's own timeout is long: the bounded waits below must come from timeout_s
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    if dist.get_rank() == 1:
        time.sleep(300)  # "stopped": never joins; the test kills it
        os._exit(0)
    from curvlab import registry
    from curvlab.experiments.distributed import DistributedContext

    reducer = registry.create("reducers", "torch_distributed", timeout_s=TIMEOUT_S)
    ctx = DistributedContext(0, 2, timeout_s=TIMEOUT_S)
    results = {
        "reducer.all_finite": timed(lambda: reducer.all_finite(torch.ones((), dtype=torch.bool))),
        "reducer.reduce": timed(lambda: reducer.reduce([torch.ones(3)], [1])),
        "context.sum": timed(lambda: ctx.sum(torch.ones(1))),
    }
    with open(out, "w") as f:
        json.dump(results, f)
    os._exit(0)  # the group cannot be torn down cleanly with a silent peer


if __name__ == "__main__":
    main(sys.argv[1])
