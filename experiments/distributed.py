"""Data-parallel runs under ``torchrun``: process group from the environment, rank-0 output,
and bounded waits.

Every collective of a run is bounded by ``train.distributed_timeout_s``: it is the process
group's timeout (``init_process_group``: DDP's gradient all-reduce, the optimizer's reducer) and
the timeout of the runner's own collectives. When a rank stops answering (SIGSTOP, a deadlock,
stuck I/O), the other ranks' next collective fails after that time; each of them then finds out
which ranks did not reach the failure too (:meth:`DistributedContext.timeout_error`) and ends
with one line naming them. Under ``torchrun`` a rank on the same host that did not respond is
sent SIGTERM (with SIGCONT, so that a stopped process receives it): torchrun would send the
same signal and wait 30 s before SIGKILL; this ends the job at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: default of ``train.distributed_timeout_s``: bounded (torch's default is 30 minutes)
DEFAULT_TIMEOUT_S = 300.0
#: how long a rank that timed out waits for the other ranks to report the same failure
_REPORT_WAIT_S = 2.0


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within the timeout; the message names the silent ranks."""


#: how collectives report their timeout: gloo ("Timed out waiting ..."; under load also
#: "Application timeout caused pair closure", when the connection to the silent peer times
#: out first), a timed ``Work.wait`` ("Operation timed out!"), NCCL's watchdog ("... timed out")
TIMEOUT_MESSAGES = ("timed out", "timeout caused pair closure")


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective's timeout (:data:`TIMEOUT_MESSAGES`)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in TIMEOUT_MESSAGES)


@dataclass
class DistributedContext:
    """Rank and world size of this process (world 1 without ``torchrun``)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
        """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), gloo on CPU and
        NCCL on CUDA, with ``timeout_s`` as the timeout of every collective; a no-op context
        otherwise. A group that already exists keeps its own timeout (the runner's
        collectives still use ``timeout_s``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(timeout_s=timeout_s)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            owns = True
        ctx = cls(dist.get_rank(), dist.get_world_size(), owns, timeout_s)
        ctx._announce()
        return ctx

    # -- collectives ------------------------------------------------------------------------------
    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``value`` in place, waiting at most ``timeout_s``."""
        if self.world > 1:
            work = dist.all_reduce(value, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- timeouts ---------------------------------------------------------------------------------
    def _key(self, what: str, rank: int) -> str:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"curvlab/{restart}/{what}/{rank}"

    @staticmethod
    def _store():  # noqa: ANN205 - a c10d Store
        with contextlib.suppress(Exception):
            return dist.distributed_c10d._get_default_store()
        return None

    def _announce(self) -> None:
        """Publish where this rank runs, so that a rank that times out can name (and, on one
        host under torchrun, end) the ranks that stopped answering."""
        store = self._store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(self._key("process", self.rank), f"{socket.gethostname()} {os.getpid()}")

    def _silent_ranks(self) -> list[int]:
        """Ranks that did not report a failed collective within a short wait after this rank
        reported its own (healthy ranks waiting on the same collective fail at the same time)."""
        store = self._store()
        if store is None:
            return []
        try:
            store.set(self._key("timed_out", self.rank), "1")
            deadline = time.monotonic() + min(_REPORT_WAIT_S, self.timeout_s)
            while True:
                silent = [
                    r for r in range(self.world) if not store.check([self._key("timed_out", r)])
                ]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store may be gone too: name nobody
            return []

    def _end_local(self, ranks: list[int]) -> list[int]:
        """SIGTERM (+ SIGCONT) to the silent ranks on this host; only under torchrun, which
        would do the same 30 s later. Returns the ranks signalled."""
        store = self._store()
        if store is None or "TORCHELASTIC_RUN_ID" not in os.environ:
            return []
        ended = []
        for rank in ranks:
            try:
                key = self._key("process", rank)
                if not store.check([key]):
                    continue
                host, pid = store.get(key).decode().split()
                if host != socket.gethostname() or int(pid) == os.getpid():
                    continue
                os.kill(int(pid), signal.SIGTERM)
                os.kill(int(pid), signal.SIGCONT)  # a stopped process acts on SIGTERM only now
                ended.append(rank)
            except Exception:  # noqa: BLE001, S112 - best effort: torchrun ends it later anyway
                continue
        return ended

    def timeout_error(self, err: BaseException) -> DistributedTimeoutError:
        """The error to raise for a collective's timeout ``err``, naming the silent ranks."""
        silent = self._silent_ranks()
        ended = self._end_local(silent)
        if silent:
            names = ", ".join(map(str, silent))
            who = f"rank{'s' if len(silent) > 1 else ''} {names} did not respond"
        else:
            who = "the rank that did not respond could not be determined"
        action = f"; sent SIGTERM to rank(s) {', '.join(map(str, ended))}" if ended else ""
        return DistributedTimeoutError(
            f"rank {self.rank}: a collective did not complete within "
            f"train.distributed_timeout_s = {self.timeout_s:g} s: {who} (stopped, deadlocked or "
            f"stuck in I/O){action}; the job ends ({str(err).strip().splitlines()[0][:120]})"
        )


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 for ``train.parallel = "fsdp"``: ``fully_shard`` on every direct child that holds
    parameters, then on the root (which takes the parameters of the children left out). Each
    rank then holds about 1/W of every parameter's rows; the forward and backward gather one
    child at a time. Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. FSDP2 leaves buffers
    per rank (DDP broadcasts rank 0's at every forward); a sharded checkpoint stores one copy
    of each, so the ranks agree on rank 0's before saving, and a resumed run evaluates with the
    statistics the uninterrupted one has on rank 0."""
    for buffer in model.buffers():
        if not hasattr(buffer, "device_mesh"):  # a DTensor buffer is laid out already
            dist.broadcast(buffer, src=0)


def spawn_local_ranks(module: str, argv: list[str], world: int) -> list[int]:
    """Run ``python -m module *argv`` as the ``world`` ranks of a job on this host (gloo on
    127.0.0.1, a free port, one intra-op thread each: the timing scripts'
    ``experiments/*_timing.py`` launcher); each process finds its rank in ``RANK``. Returns
    their exit codes once all have ended."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen([sys.executable, "-m", module, *argv], env=dict(env, RANK=str(r)))
        for r in range(world)
    ]
    return [p.wait() for p in procs]


def run_timing_job(
    module: str, args: Any, argv: list[str] | None, run_rank: Callable[[Any], dict]
) -> dict | None:
    """The timing scripts' ``main``: in a rank (``RANK`` set) run ``run_rank(args)``, rank 0
    writing ``{"args", "torch", **result}`` to ``args.out``, and return None; otherwise start
    ``args.world`` local ranks of ``module`` (:func:`spawn_local_ranks`) and return what rank 0
    wrote, or None (exit codes printed) when a rank failed."""
    import torch

    if "RANK" in os.environ:
        result = run_rank(args)
        if int(os.environ["RANK"]) == 0:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "torch": torch.__version__, **result}, f, indent=1)
        return None
    argv = sys.argv[1:] if argv is None else argv
    codes = spawn_local_ranks(module, argv, args.world)
    if any(codes):
        print(f"a rank failed: exit codes {codes}", file=sys.stderr)
        return None
    with open(args.out) as f:
        return json.load(f)
