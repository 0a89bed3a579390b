"""The training loop: budgets (wall-clock protocol), augmentation, baselines, the main job."""

import json

import gin
import pytest
import torch

from curvlab.config import parse_config
from curvlab.experiments import data, models
from curvlab.experiments.train import reference_time, torch_optimizer, train


def tiny_digits():
    return data.digits()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def mlp():
    return models.mlp(in_features=64, hidden=(16,))


def test_train_writes_metrics_summary_and_config(tmp_path):
    summary = train(model=mlp, data=tiny_digits, optimizer=sgd, epochs=2, out_dir=tmp_path,
                    quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1] == summary == json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["train_time_s"] <= summary["time_s"]
    assert rows[0]["train_time_s"] < rows[1]["train_time_s"]  # cumulative
    assert (tmp_path / "operative_config.gin").is_file()


def test_time_budget_stops_after_the_epoch_that_exceeds_it():
    summary = train(model=mlp, data=tiny_digits, optimizer=sgd, epochs=50, time_budget_s=0.0,
                    quiet=True)
    assert summary["epoch"] == 1 and summary["time_budget_s"] == 0.0


def write_reference(path, times):
    path.mkdir()
    rows = [dict(epoch=i + 1, train_time_s=t, time_s=t + 0.1) for i, t in enumerate(times)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(rows[-1]))


def test_budget_from_a_reference_run(tmp_path):
    ref = tmp_path / "adam"
    write_reference(ref, [0.5, 1.0, 1.5])
    assert reference_time(ref, 2) == 1.0
    assert reference_time(ref / "summary.json", 3) == 1.5
    with pytest.raises(ValueError, match="only 3 epoch"):
        reference_time(ref, 4)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        reference_time(tmp_path / "nowhere", 1)

    write_reference(tmp_path / "instant", [0.0, 0.0])
    summary = train(model=mlp, data=tiny_digits, optimizer=sgd, epochs=20,
                    time_budget_from=str(tmp_path / "instant" / "summary.json"),
                    time_budget_epochs=2, quiet=True)
    assert summary["epoch"] == 1 and summary["time_budget_s"] == 0.0


def test_budget_arguments_are_checked(tmp_path):
    kwargs = dict(model=mlp, data=tiny_digits, optimizer=sgd, quiet=True)
    with pytest.raises(ValueError, match="time_budget_epochs"):
        train(**kwargs, time_budget_from=str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        train(**kwargs, time_budget_s=1.0, time_budget_from=str(tmp_path), time_budget_epochs=1)
    with pytest.raises(ValueError, match="needs train.time_budget_from"):
        train(**kwargs, time_budget_epochs=1)


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    train(model=mlp, data=tiny_digits, optimizer=sgd, epochs=1, num_threads=1, quiet=True)
    assert torch.get_num_threads() == before


def test_augment_is_applied_to_training_batches():
    seen = []

    def record(x):
        seen.append(x.shape)
        return x

    split = data.synthetic_cifar(n_train=32, n_test=16)
    train(model=lambda: models.mlp(in_features=3072, hidden=(8,)), data=lambda: split,
          optimizer=sgd, epochs=1, batch_size=16, augment=record, quiet=True)
    assert seen == [(16, 3, 32, 32)] * 2
    summary = train(model=lambda: models.mlp(in_features=3072, hidden=(8,)), data=lambda: split,
                    optimizer=sgd, epochs=1, batch_size=16, augment=True, quiet=True)
    assert summary["epoch"] == 1


def test_torch_baselines_through_gin():
    parse_config(None, [
        "baselines.torch_optimizer.name = 'SGD'",
        "baselines.torch_optimizer.lr = 0.3",
        "baselines.torch_optimizer.momentum = 0.9",
    ])
    opt = torch_optimizer(mlp())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 0.3 and opt.defaults["momentum"] == 0.9
    gin.clear_config()
    with pytest.raises(ValueError, match="must be one of"):
        torch_optimizer(mlp(), name="Lion")


@pytest.mark.slow
def test_readme_main_job_reaches_95_percent(tmp_path):
    """`curvlab run configs/digits_adafisher.gin`: >= 95% test accuracy in < 60 s (one thread:
    on a loaded 2-core machine, two OpenMP threads per process slow this tiny model down 10×)."""
    parse_config("configs/digits_adafisher.gin", ["train.num_threads = 1"])
    summary = train(out_dir=str(tmp_path), quiet=True)
    assert summary["epoch"] == 15
    assert summary["test_accuracy"] >= 0.95
    assert summary["train_time_s"] < 60
