"""Non-finite batches leave no trace: parameters, optimizer state *and buffers* (BatchNorm
running statistics) are as if the batch never happened; skipped steps are counted in
metrics.jsonl and summary.json (strict JSON) and reported; a run that trained nothing fails."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.config import parse_config
from curvlab.experiments import rundir
from curvlab.experiments.train import train
from tests.faults.helpers import DIGITS, NAN_PLUGIN, REPO, assert_one_line_error
from tests.faults.test_checkpoint_faults import rows
from tests.faults.test_user_errors import run_cli


def strict_json(path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON literal {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3),
    )  # fmt: skip


OPTIMIZERS = {
    "adafisher": lambda m: curvlab.AdaFisher(m, lr=1e-2),
    "adafisher_official": lambda m: curvlab.AdaFisher(m, lr=1e-3, variant="official"),
    "kfac": lambda m: curvlab.build_optimizer(m, REPO / "configs" / "kfac.gin"),
    "adam": lambda m: curvlab.build_optimizer(m, REPO / "configs" / "adam.gin"),
}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(4)
    ]


def trained(make, data) -> tuple[nn.Module, curvlab.CurvatureOptimizer]:
    torch.manual_seed(0)
    model = bn_net()
    opt = make(model)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    ("name", "device_path"), [(name, False) for name in OPTIMIZERS] + [("adafisher", True)]
)
def test_skipped_batch_leaves_no_trace_in_parameters_and_buffers(name, device_path, monkeypatch):
    """b0, (b1 with one NaN pixel), b2, b3 equals b0, b2, b3 bitwise: BatchNorm's running
    statistics included (the optimizer restores them). ``device_path``: the finite flag is
    never read on the host, as on CUDA, so accepted steps go through the blend too
    (tests/test_fast_paths.py checks that this path issues no synchronising op)."""
    from curvlab.interfaces import update

    monkeypatch.setattr(update, "READ_CPU_FLAGS", not device_path)
    data = batches()
    poisoned = data[1][0].clone()
    poisoned[2, 0, 1, 1] = float("nan")
    with_nan, opt = trained(OPTIMIZERS[name], [data[0], (poisoned, data[1][1]), *data[2:]])
    without, _ = trained(OPTIMIZERS[name], [data[0], *data[2:]])
    assert opt.metrics()["skipped_steps"] == 1
    for (key, a), (_, b) in zip(with_nan.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), (name, key)  # weights, running_mean/var, num_batches_tracked


def test_buffers_of_an_accepted_step_are_kept_and_eval_forwards_ignored():
    model = bn_net()
    opt = curvlab.AdaFisher(model)
    x, y = batches()[0]
    model.eval()
    model(x)  # an evaluation forward takes no snapshot
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mean = model[1].running_mean.clone()
    opt.step()
    assert torch.equal(model[1].running_mean, mean) and model[1].num_batches_tracked == 1


@pytest.mark.slow
def test_one_nan_sample_in_the_readme_job(tmp_path, capsys):
    """README's Conv+BatchNorm digits job with one NaN pixel in one training sample: every
    epoch skips that sample's batch, and the final accuracy stays within 1 point of the clean
    run (without the buffer restore it was 10%: every evaluation NaN)."""
    parse_config(DIGITS, [])
    clean = train(out_dir=str(tmp_path / "clean"), quiet=True)
    parse_config(DIGITS, ["train.data = @faults.digits_with_nan"], plugins=[NAN_PLUGIN])
    capsys.readouterr()
    faulty = train(out_dir=str(tmp_path / "nan"), quiet=True)
    err = capsys.readouterr().err
    assert abs(faulty["test_accuracy"] - clean["test_accuracy"]) <= 0.01, (faulty, clean)
    summary = strict_json(tmp_path / "nan" / "summary.json")
    assert summary["skipped_steps"] == summary["epoch"] == 15  # the batch of sample 5, each epoch
    assert [r["skipped_steps"] for r in rows(tmp_path / "nan")] == list(range(1, 16))
    assert all(math.isfinite(r["train_loss"]) for r in rows(tmp_path / "nan"))
    assert "warning: 15 of 345 optimizer steps were skipped" in err
    assert clean["skipped_steps"] == 0


def test_a_run_whose_every_step_is_skipped_fails(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, [
        "run", DIGITS, "--quiet", "--out", out, "--plugins", NAN_PLUGIN,
        "--bind", "train.data = @faults.all_nan_digits", "--bind", "train.epochs = 1",
    ])  # fmt: skip
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("warning: 23 of 23 optimizer steps were skipped")
    assert_one_line_error(code, lines[1], "all 23 optimizer steps were skipped")
    summary = strict_json(out / "summary.json")  # the record is written before the failure
    assert summary["skipped_steps"] == summary["steps"] == 23 and summary["train_loss"] is None


def test_non_finite_test_data_fails_the_run(tmp_path, capsys):
    code, err = run_cli(capsys, [
        "run", DIGITS, "--quiet", "--out", tmp_path / "run", "--plugins", NAN_PLUGIN,
        "--bind", "train.data = @faults.digits_with_nan", "--bind", "train.epochs = 1",
        "--bind", "faults.digits_with_nan.samples = ()",
        "--bind", "faults.digits_with_nan.test = True",
    ])  # fmt: skip
    assert_one_line_error(code, err, "final test_loss is nan", "evaluation data")
    assert strict_json(tmp_path / "run" / "summary.json")["test_loss"] is None


def test_strict_json_maps_non_finite_numbers_to_null():
    text = rundir.dumps({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": "x"})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": "x"}
