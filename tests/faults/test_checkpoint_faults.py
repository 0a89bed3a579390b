"""Checkpoint faults: a SIGKILL in the middle of a save, crafted, truncated, garbage and empty
checkpoints (docs/reliability.md, "Runs")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from curvlab.config import parse_config
from curvlab.experiments.checkpoint import (
    PAUSE_ENV,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    temporary_files,
)
from curvlab.experiments.train import train
from tests.faults.helpers import DIGITS, REPO, assert_one_line_error, env
from tests.faults.test_user_errors import CreatesAFile, run_cli

EPOCHS = ["--bind", "train.epochs = 3", "--bind", "train.checkpoint_every = 1"]
METRICS = ("train_loss", "test_loss", "test_accuracy", "steps", "skipped_steps")


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_sigkill_during_a_checkpoint_save_loses_nothing(tmp_path):
    """The second save pauses (test hook) once 4 KiB of its temporary file are on disk; a
    SIGKILL then leaves the first checkpoint intact; the resumed run completes every epoch,
    each logged once, with the numbers of an uninterrupted run."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    cmd = [sys.executable, "-m", "curvlab", "run", DIGITS, *EPOCHS, "--out", str(out), "--quiet"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(**{PAUSE_ENV: f"2:{marker}"}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the save never paused"
            time.sleep(0.05)
        # the kill lands inside the write: the new checkpoint is partly on disk
        (partial,) = temporary_files(out / "checkpoint.pt")
        assert partial.stat().st_size >= 4096
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous one, intact
    with pytest.raises(CheckpointError, match="truncated"):  # the partial file is no checkpoint
        load_checkpoint(partial)
    assert [r["epoch"] for r in rows(out)] == [1, 2]  # epoch 2 was logged before the kill

    resumed = subprocess.run(
        [*cmd, "--bind", "train.resume = True"], cwd=REPO, env=env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]  # each epoch logged once
    assert temporary_files(out / "checkpoint.pt") == []
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 3

    parse_config(DIGITS, ["train.epochs = 3"])
    train(out_dir=str(tmp_path / "uninterrupted"), quiet=True)
    reference = rows(tmp_path / "uninterrupted")
    assert [{k: r[k] for k in METRICS} for r in rows(out)] == [
        {k: r[k] for k in METRICS} for r in reference
    ]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial new content")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and temporary_files(target) == []
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # follows the umask, as open() does


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run with a checkpoint (made once for the corruption cases)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    parse_config(DIGITS, ["train.epochs = 1", "train.checkpoint_every = 1"])
    train(out_dir=str(out), quiet=True)
    return out


def test_crafted_checkpoint_is_refused_and_runs_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    evidence = tmp_path / "pwned"
    torch.save({"format": 1, "kind": "train", "model": CreatesAFile(evidence)},
               out / "checkpoint.pt")
    before = files(out)
    code, err = run_cli(capsys, ["run", DIGITS, "--quiet", "--out", out, "--bind",
                                 "train.resume = True", "--bind", "train.epochs = 2"])
    assert_one_line_error(code, err, str(out / "checkpoint.pt"), "weights_only", "io.open")
    assert not evidence.exists()
    assert files(out) == before
    torch.load(out / "checkpoint.pt", weights_only=False)  # the payload is real
    assert evidence.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_checkpoint_is_one_line_and_changes_nothing(damage, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(len(data)),
        "empty": b"",
    }[damage]
    checkpoint.write_bytes(broken)
    before = files(out)
    code, err = run_cli(capsys, ["run", DIGITS, "--quiet", "--out", out, "--bind",
                                 "train.resume = True", "--bind", "train.epochs = 2"])
    line = assert_one_line_error(code, err, str(checkpoint))
    assert ("empty" if damage == "empty" else "cannot be read") in line
    assert files(out) == before


def test_a_file_that_is_not_a_run_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, path)  # a plain state dict: loadable, not a run
    with pytest.raises(CheckpointError, match="not a checkpoint of a `train` run"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_model_is_named(finished_run):
    """The config check catches changed bindings; a model whose *code* changed is caught when
    its state is loaded."""
    from curvlab.experiments.checkpoint import restore

    state = load_checkpoint(finished_run / "checkpoint.pt")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="does not fit this model or optimizer"):
        restore(finished_run / "checkpoint.pt", model, torch.optim.SGD(model.parameters()), state)
