"""The MNIST-1D study harness: learning-rate selection, the rates file, the wall-clock stage."""

import csv
import json

import pytest

from curvlab.config import CONFIG_ROOT
from curvlab.experiments import ablate, mnist1d_study
from curvlab.experiments.mnist1d_study import (
    DEFAULT_LR_FILE,
    lr_bindings,
    read_lr_file,
    select,
    write_lr_file,
)


def row(variant, seed, acc, loss, status="ok"):
    return dict(variant=variant, seed=seed, status=status, test_accuracy=acc, test_loss=loss)


def test_select_takes_the_best_mean_accuracy_ties_to_lower_loss():
    rows = [
        row("adam_lr1e-3", 0, 0.80, 0.5), row("adam_lr1e-3", 1, 0.90, 0.5),  # mean 0.85
        row("adam_lr1e-2", 0, 0.86, 0.4), row("adam_lr1e-2", 1, 0.84, 0.4),  # 0.85, lower loss
        row("adam_lr3e-2", 0, 0.95, 0.1), row("adam_lr3e-2", 1, 0.0, 0.0, "missing"),  # unfinished
        row("no_ema_lr1e-4", 0, 0.5, 1.0), row("no_ema_lr3e-4", 0, 0.6, 1.0),
        row("no_ema_lr1e-3", 0, 0.4, float("nan")),  # diverged: nan loss, low accuracy
        row("sgd_lr1e-1", 0, 0.1, None), row("sgd_lr1e-2", 0, 0.1, ""),  # null in JSON, CSV
        row("sgd_lr1e-3", 0, 0.1, 2.3),
    ]
    choices = select(rows)
    adam = choices["adam"]
    assert adam.lr == "1e-2" and adam.accuracy[0] == pytest.approx(0.85)
    assert adam.table["3e-2"] is None and not adam.at_edge  # 3e-2 had a failed seed
    assert adam.accuracy[1] == pytest.approx(0.01414, abs=1e-4)  # sample std of 0.86, 0.84
    assert choices["no_ema"].lr == "3e-4" and not choices["no_ema"].at_edge
    assert choices["sgd"].lr == "1e-3"  # equal accuracies: the finite loss wins
    edge = select([row("sgd_lr1e-2", 0, 0.5, 1.0), row("sgd_lr1e-1", 0, 0.7, 1.0)])
    assert edge["sgd"].lr == "1e-1" and edge["sgd"].at_edge
    with pytest.raises(ValueError, match="<variant>_lr<lr>"):
        select([row("adam", 0, 0.5, 1.0)])


def test_rates_file_round_trip_and_provisional_guard(tmp_path):
    path = tmp_path / "lr.gin"
    write_lr_file(path, {"LR_CNN_ADAM": "1e-2", "LR_GRU_ADAM": "3e-3"},
                  {"LR_CNN": "selected"}, {"LR_CNN_ADAM": "validation 90 %"})
    macros, status = read_lr_file(path)
    assert macros == {"LR_CNN_ADAM": "1e-2", "LR_GRU_ADAM": "3e-3"}
    assert status == {"LR_CNN": "selected", "LR_GRU": "provisional"}
    assert lr_bindings(path, "LR_CNN", False) == ["LR_CNN_ADAM = 1e-2"]
    with pytest.raises(SystemExit, match="LR_GRU_\\* learning rates are provisional"):
        lr_bindings(path, "LR_GRU", False)
    assert lr_bindings(path, "LR_GRU", True) == ["LR_GRU_ADAM = 3e-3"]


def test_committed_rates_file_parses():
    macros, status = read_lr_file(DEFAULT_LR_FILE)
    assert set(status) == {"LR_CNN", "LR_GRU"}
    assert all(float(v) > 0 for v in macros.values())


def finish(run, acc, loss=1.0, train_time=1.0, epochs=2):
    """Write what a finished `curvlab run` leaves (as ablate.execute would)."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "run.json").write_text(json.dumps(run.record()))
    rows = [dict(epoch=e + 1, train_loss=loss, test_loss=loss, test_accuracy=acc,
                 train_time_s=train_time * (e + 1) / epochs, time_s=train_time * (e + 1) / epochs)
            for e in range(epochs)]
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run.out / "summary.json").write_text(json.dumps(rows[-1]))


def test_select_stage_writes_the_rates_of_a_finished_sweep(tmp_path):
    sweep = ablate.load_grid(CONFIG_ROOT / "ablations" / "mnist1d_gru_lr_sweep.gin")
    out = tmp_path / "runs"
    best = {"adafisher": "3e-3", "fallback_sq": "1e-3", "adam": "1e-2"}
    for run in sweep.runs(out / "gru" / "sweep"):
        base, _, lr = run.variant.rpartition("_lr")
        finish(run, 0.9 if lr == best[base] else 0.5)
    lr_file = tmp_path / "lr.gin"
    mnist1d_study.main(["select", "--study", "gru", "--out", str(out), "--lr-file", str(lr_file)])
    macros, status = read_lr_file(lr_file)
    assert status["LR_GRU"] == "selected"
    assert status["LR_CNN"] == read_lr_file(DEFAULT_LR_FILE)[1]["LR_CNN"]  # kept from the default
    assert {k: macros[k] for k in macros if k.startswith("LR_GRU")} == {
        "LR_GRU_ADAFISHER": "3e-3", "LR_GRU_FALLBACK_SQ": "1e-3", "LR_GRU_ADAM": "1e-2"}
    assert macros["LR_CNN_ADAM"] == read_lr_file(DEFAULT_LR_FILE)[0]["LR_CNN_ADAM"]  # kept
    assert "edge of the swept range" in lr_file.read_text()  # fallback_sq: the lowest rate
    assert (out / "gru" / "sweep" / "selection.md").is_file()
    assert (out / "gru" / "sweep" / "lr_sensitivity.png").stat().st_size > 0


def test_time_stage_budgets_from_the_reference_and_repeats_loaded_blocks(tmp_path, monkeypatch):
    executed = []

    def fake_execute(run, threads=None):
        executed.append(run)
        budget = [b for b in run.bindings if b.startswith("train.time_budget_from")]
        if run.variant == "adam":
            assert not budget
        else:  # budget = the reference run of the same seed and attempt
            ref = run.out.parent.parent / "adam" / run.out.name
            assert budget == [f"train.time_budget_from = '{ref}'"]
            assert "train.time_budget_epochs = 2" in run.bindings
            assert "train.epochs = 20" in run.bindings
        finish(run, 0.5 + 0.1 * len(executed))
        return ablate.Outcome(run, "done", 1.0)

    # seed 0: first block loaded (5 runnable tasks > 2), the repeat quiet; seed 1: both loaded
    loads = iter([5, 1, 1, 1, 1, 1, 6, 6, 6, 4, 9, 9])
    monkeypatch.setattr(ablate, "execute", fake_execute)
    monkeypatch.setattr(mnist1d_study.LoadMonitor, "window",
                        lambda self, start, end: dict(runnable_mean=next(loads), runnable_max=9,
                                                      loadavg_1min_end=1.0, process_s=1.0))
    out = tmp_path / "runs"
    mnist1d_study.main(["time", "--study", "gru", "--out", str(out), "--seeds", "0", "1",
                        "--provisional", "--max-load", "2", "--repeats", "1"])
    assert len(executed) == 12  # 2 seeds x 2 attempts x 3 variants
    assert [r.variant for r in executed[:3]] == ["adam", "adafisher", "fallback_sq"]
    with open(out / "gru" / "time" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = {(r["variant"], r["seed"]): r["out_dir"] for r in rows}
    assert "try_1" in chosen[("adam", "0")]  # the quiet repeat
    assert "try_0" in chosen[("adam", "1")]  # both loaded: the less loaded block (max 6 < 9)
    assert "try_0" in chosen[("fallback_sq", "1")] and "try_1" in chosen[("adafisher", "0")]
    load = (out / "gru" / "time" / "load.md").read_text()
    assert load.count("| yes |") == 6 and "| 1 | 1 | `adam` | 4.00 |" in load


def test_estimate_adds_up_the_grid_from_measured_epoch_times(tmp_path, capsys):
    pilot = tmp_path / "pilot"
    for variant, per_epoch in (("adam", 1.0), ("adafisher", 2.0)):
        run = pilot / variant / "seed_0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(dict(epoch=10, train_time_s=10 * per_epoch)))
        (run / "load.json").write_text(json.dumps(dict(process_s=10 * per_epoch + 10)))
    mnist1d_study.main(["estimate", "--study", "gru", "--from", str(pilot)])
    lines = capsys.readouterr().out.splitlines()
    # 8000 steps = 200 epochs; 10 s start-up; fallback_sq (not in the pilot) at the slowest rate;
    # the sweep: 63 epochs of the validation split's 32 batches = 50.4 epochs of 40, 1 seed
    sweep = 4 * (10 + 50.4 * 1.0) + 6 * (10 + 50.4 * 2.0) + 4 * (10 + 50.4 * 2.0)
    steps = 5 * ((10 + 200 * 1.0) + 2 * (10 + 200 * 2.0))
    budget = 3 * 5 * (10 + 200 * 1.0)  # every timed run lasts the reference's (adam) time
    assert lines[0].endswith(f"{sweep / 3600:.1f} h") and lines[1].endswith(f"{steps / 3600:.1f} h")
    assert lines[2].endswith(f"{budget / 3600:.1f} h")
    assert lines[3].startswith(f"gru total: {(sweep + steps + budget) / 3600:.1f} h")


def test_paired_difference_is_over_the_seeds_both_finished():
    rows = [row("adam", 0, 0.90, 1.0), row("adam", 1, 0.80, 1.0), row("adam", 2, 0.70, 1.0),
            row("sgd", 0, 0.95, 1.0), row("sgd", 1, 0.70, 1.0)]  # sgd seed 2 missing
    mean, std, wins, n = mnist1d_study.paired(rows, "sgd", "adam")
    # differences +0.05 and -0.10: mean -0.025, sample std sqrt(2 * 0.075^2) = 0.10607
    assert (wins, n) == (1, 2)
    assert mean == pytest.approx(-0.025) and std == pytest.approx(0.106066, abs=1e-6)
    assert mnist1d_study.paired(rows, "kfac", "adam") is None


def test_report_stage_puts_equal_steps_and_equal_time_side_by_side(tmp_path):
    grid = ablate.load_grid(CONFIG_ROOT / "ablations" / "mnist1d_gru.gin")
    out = tmp_path / "runs"
    acc = {"adam": [0.90, 0.92], "adafisher": [0.85, 0.91], "fallback_sq": [0.93, 0.95]}
    for stage, shift in (("steps", 0.0), ("time", -0.01)):
        runs = grid.runs(out / "gru" / stage)
        for r in runs:
            if r.seed < 2:
                finish(r, acc[r.variant][r.seed] + shift, epochs=3 if stage == "time" else 2)
        ablate.report(grid, runs, out / "gru" / stage, stage, None)
    mnist1d_study.main(["report", "--study", "gru", "--out", str(out)])
    text = (out / "gru" / "summary.md").read_text()
    # adafisher: 88.00 ± 4.24 over 2 seeds; vs adam: -0.05, -0.01 -> -3.00 ± 2.83, 0 of 2 higher
    assert "| `adafisher` | " in text and "88.00 ± 4.24 (2) | -3.00 ± 2.83 (0/2) |" in text
    assert "87.00 ± 4.24 (2) | -3.00 ± 2.83 (0/2) | 3 |" in text  # equal time: shifted, 3 epochs
    assert "94.00 ± 1.41 (2) | +3.00 ± 0.00 (2/2) |" in text  # fallback_sq
    assert (out / "gru" / "steps" / "test_accuracy_vs_step.png").stat().st_size > 0
