"""`curvlab run` under torchrun (data-parallel, rank-0 output) and checkpoint resume."""

import json
import os
import socket
import subprocess
import sys

import pytest

from curvlab.config import parse_config
from curvlab.experiments.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_trains_and_rank_zero_writes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "curvlab", "run", "configs/digits_adafisher.gin", "--quiet",
        "--bind", "train.epochs=3", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = [line for line in done.stdout.splitlines() if line.startswith("final:")]
    assert len(finals) == 1  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epoch"] == 3
    assert summary["test_accuracy"] > 0.85
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    def run(out, epochs, resume=False):
        parse_config(
            "configs/digits_adafisher.gin",
            [f"train.epochs = {epochs}", "train.checkpoint_every = 1", f"train.resume = {resume}"],
        )
        return train(out_dir=str(out), quiet=True)

    full = run(tmp_path / "full", 3)
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 3, resume=True)
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[key] == full[key]  # bitwise: model, optimizer (factors) and RNG restored
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
