"""Distributed waits are bounded: ``train.distributed_timeout_s`` reaches the process group,
the reducer and the runner's collectives; a stopped rank ends the whole job within the bound,
with a message naming it. gloo on 127.0.0.1, processes with bounded timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.helpers import DIGITS, REPO, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


@pytest.mark.slow
def test_reducer_and_runner_collectives_time_out_at_timeout_s(tmp_path):
    """Rank 1 never joins; rank 0's group timeout is 120 s, yet every wait of the reducer and
    of the runner ends after timeout_s = 1.5 s."""
    out, port = tmp_path / "result.json", free_port()
    procs = []
    try:
        for rank in (0, 1):
            rank_env = env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.faults.stalled_rank", str(out)], cwd=REPO,
                env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))  # fmt: skip
        stdout, _ = procs[0].communicate(timeout=180)
        assert procs[0].returncode == 0, stdout[-3000:]
    finally:
        for proc in procs:
            kill(proc.pid)
            proc.wait()
    results = json.loads(out.read_text())
    for name, result in results.items():
        assert result["error"] is not None and "timed out" in result["error"].lower(), name
        assert 1.4 <= result["seconds"] < 10.0, (name, result)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
def test_a_stopped_rank_ends_the_torchrun_job_within_the_timeout(tmp_path):
    """SIGSTOP one rank of a 2-rank torchrun job (timeout 3 s): the job ends within the
    timeout plus start-up slack, far below torchrun's 30 s grace, naming rank 1."""
    timeout_s, out = 3, tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "curvlab", "run", DIGITS, "--quiet", "--bind", "train.epochs = 500",
        "--bind", f"train.distributed_timeout_s = {timeout_s}", "--out", str(out),
    ]  # fmt: skip
    log = open(tmp_path / "log.txt", "w+")  # noqa: SIM115 - read after the job
    job = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert job.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        ranks = {rank_of(pid): pid for pid in children(job.pid)}
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        job.wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if stopped is not None:
            kill(stopped)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert job.returncode != 0
    assert elapsed < timeout_s + 12, (elapsed, text[-3000:])
    assert (
        f"error: rank 0: a collective did not complete within train.distributed_timeout_s = "
        f"{timeout_s} s: rank 1 did not respond" in text
    ), text[-3000:]


def test_both_ways_gloo_reports_a_timeout_are_recognised():
    """Under load gloo reported the stopped rank's timeout as "Application timeout caused pair
    closure" (a full CI run: the job then ran torchrun's 30 s grace, 35.7 s, instead of
    signalling the silent rank). Both that and "Timed out waiting …" are a collective's
    timeout; other errors are not."""
    from curvlab.experiments.distributed import is_timeout

    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
    assert is_timeout(RuntimeError(gloo + "Timed out waiting 3000ms for recv operation"))
    assert is_timeout(RuntimeError(gloo + "Application timeout caused pair closure"))
    assert is_timeout(RuntimeError("Operation timed out!"))
    assert not is_timeout(RuntimeError(gloo + "Connection closed by peer [127.0.0.1]:1234"))
    assert not is_timeout(ValueError("timed out"))  # not a collective's error
