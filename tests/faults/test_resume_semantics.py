"""Resume semantics and the output directory: ``train.resume = True`` / a path, refused
setting changes, and a fresh run that never truncates an earlier run (``--overwrite``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import curvlab
from curvlab.experiments.checkpoint import load_checkpoint
from curvlab.experiments.train_lm import train_lm
from tests.experiments.test_lm import tiny_corpus, tiny_gpt
from tests.faults.helpers import DIGITS, assert_one_line_error
from tests.faults.test_checkpoint_faults import files, rows
from tests.faults.test_user_errors import run_cli

ONE_EPOCH = ["--quiet", "--bind", "train.epochs = 1", "--bind", "train.checkpoint_every = 1"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    from curvlab import cli

    out = tmp_path_factory.mktemp("one_epoch") / "run"
    assert cli.main(["run", DIGITS, *ONE_EPOCH, "--out", str(out)]) == 0
    return out


def test_a_fresh_run_never_truncates_an_earlier_run(one_epoch_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    before = files(out)
    code, err = run_cli(capsys, ["run", DIGITS, *ONE_EPOCH, "--out", out])
    assert_one_line_error(code, err, str(out), "already holds a run", "--overwrite",
                          "train.resume=True")
    assert files(out) == before
    leftover = out / ".checkpoint.pt.1234.abcd.tmp"  # a killed save's temporary file
    leftover.write_bytes(b"partial")
    code, _ = run_cli(capsys, ["run", DIGITS, *ONE_EPOCH, "--out", out, "--overwrite"])
    assert code == 0
    assert [r["epoch"] for r in rows(out)] == [1] and not leftover.exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_resume_refuses_changed_settings_and_allows_more_epochs(one_epoch_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    before = files(out)
    resume = ["run", DIGITS, *ONE_EPOCH, "--out", out, "--bind", "train.resume = True",
              "--bind", "train.epochs = 2"]
    code, err = run_cli(capsys, [*resume, "--bind", "optimizer.lr = 0.002",
                                 "--bind", "train.batch_size = 32"])
    assert_one_line_error(code, err, str(out / "checkpoint.pt"), "optimizer.lr: 0.001 -> 0.002",
                          "train.batch_size: 64 -> 32")
    assert files(out) == before  # summary.json and metrics.jsonl untouched
    code, err = run_cli(capsys, resume)  # more epochs: the same run, continued
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    operative = (out / "operative_config.gin").read_text()
    assert "train.epochs = 2" in operative and "optimizer.lr = 0.001" in operative


def test_resume_from_a_checkpoint_path_into_another_directory(one_epoch_run, tmp_path, capsys):
    original = files(one_epoch_run)
    out = tmp_path / "continued"
    code, err = run_cli(capsys, ["run", DIGITS, "--quiet", "--out", out, "--bind",
                                 "train.epochs = 2", "--bind", "train.checkpoint_every = 1",
                                 "--bind", f"train.resume = '{one_epoch_run / 'checkpoint.pt'}'"])
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    assert rows(out)[0] == rows(one_epoch_run)[0]
    assert files(one_epoch_run) == original
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["steps"] == 2 * rows(out)[0]["steps"]


def test_resume_true_without_a_checkpoint_fails_clearly(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, ["run", DIGITS, "--quiet", "--out", out, "--bind",
                                 "train.resume = True"])
    assert_one_line_error(code, err, f"no checkpoint at {out / 'checkpoint.pt'}",
                          "train.checkpoint_every")


def test_language_model_checkpoint_resume_is_bitwise(tmp_path):
    """The LM runner uses the same checkpoint module: 6 steps equal 3 + resume + 3."""

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        return train_lm(
            model=tiny_gpt, data=tiny_corpus, optimizer=lambda m: curvlab.AdaFisherW(m, lr=1e-3),
            steps=steps, batch_size=4, eval_every=3, eval_tokens=256, final_eval_tokens=256,
            checkpoint_every=3, resume=resume, out_dir=str(out), quiet=True,
        )  # fmt: skip

    full = run(tmp_path / "full", 6)
    run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, resume=True)
    keys = ("steps", "train_loss", "val_loss", "test_loss", "skipped_steps")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    logged = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows(tmp_path / "split")]
    assert logged == [(r["step"], r["train_loss"], r["val_loss"]) for r in rows(tmp_path / "full")]
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt", kind="lm")
    assert state["step"] == 6
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path / "full", 6)
