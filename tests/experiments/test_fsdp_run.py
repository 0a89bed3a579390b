"""`curvlab run` under torchrun with ``train.parallel = "fsdp"`` (FSDP2 instead of DDP)."""

import json
import os
import subprocess
import sys

import pytest

from curvlab.config import parse_config
from curvlab.experiments.train import train
from curvlab.validation import ConfigError
from tests.experiments.test_distributed_run import free_port


def torchrun(out, *bindings):
    """Start ``curvlab run`` on 2 gloo ranks (one epoch on digits); returns the process."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "curvlab", "run", "configs/digits_adafisher.gin", "--quiet",
        "--bind", "train.epochs=1", "--out", str(out),
    ]  # fmt: skip
    for binding in bindings:
        cmd += ["--bind", binding]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def summary(job, out):
    try:
        _, stderr = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # two torchrun jobs of 2 ranks at once, one epoch each (≈ 30 s)
def test_fsdp_run_equals_ddp_run_and_its_sharded_checkpoint_resumes(tmp_path):
    """The same data, seed and optimizer sharded with FSDP2 give DDP's numbers (2 ranks: the
    gradient reduce-scatter sums the same two terms as DDP's all-reduce); the sharded checkpoint
    (a DCP directory named by checkpoint.pt) resumes in one process."""
    # both jobs at once (their start-up is mostly waiting)
    ddp_job = torchrun(tmp_path / "ddp")
    fsdp_job = torchrun(tmp_path / "fsdp", 'train.parallel = "fsdp"', "train.checkpoint_every = 1")
    ddp, fsdp = summary(ddp_job, tmp_path / "ddp"), summary(fsdp_job, tmp_path / "fsdp")
    for key in ("train_loss", "test_loss", "test_accuracy", "steps"):
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-6, abs=1e-9), key
    assert fsdp["world_size"] == 2 and fsdp["skipped_steps"] == 0
    # coverage names the layers' own classes, not FSDP2's subclasses
    assert fsdp["coverage"]["layers"] == ddp["coverage"]["layers"]
    assert (tmp_path / "fsdp" / "checkpoint.epoch1.dcp").is_dir()

    parse_config(
        "configs/digits_adafisher.gin",
        ['train.parallel = "fsdp"', "train.epochs = 2", "train.checkpoint_every = 1",
         "train.resume = True"],
    )  # fmt: skip
    resumed = train(out_dir=str(tmp_path / "fsdp"), quiet=True)
    assert resumed["epoch"] == 2 and resumed["steps"] > fsdp["steps"]
    rows = (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["train_loss"] == fsdp["train_loss"]  # the restored history
    # one process saves the whole state in checkpoint.pt; the sharded directory is removed
    assert not list((tmp_path / "fsdp").glob("*.dcp"))


def test_unknown_parallel_mode_is_one_clear_error(tmp_path):
    parse_config("configs/digits_adafisher.gin", ['train.parallel = "zero3"'])
    with pytest.raises(
        ConfigError, match=r"train.parallel must be one of 'ddp', 'fsdp', got 'zero3'"
    ):
        train(out_dir=str(tmp_path / "run"), quiet=True)
