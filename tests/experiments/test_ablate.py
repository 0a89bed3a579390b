"""``curvlab ablate``: grid definition, run commands, tables, plots, resuming."""

import csv
import json
import math
from pathlib import Path

import pytest

from curvlab import cli
from curvlab.config import CONFIG_ROOT
from curvlab.experiments import ablate

GRID = """
ablate.base = "configs/digits_adafisher.gin"
ablate.seeds = [0, 1]
ablate.bindings = ["train.epochs = 2"]
ablate.variants = {
    "adafisher": [],
    "sqrt": ["ablations/sqrt.gin"],
}
"""


def test_grid_file_defines_runs_in_order(tmp_path):
    (tmp_path / "grid.gin").write_text(GRID)
    grid = ablate.load_grid(tmp_path / "grid.gin", ["ablate.seeds = [3, 4]"])
    runs = grid.runs(tmp_path / "out", ["train.batch_size = 32"])
    assert [(r.variant, r.seed) for r in runs] == [
        ("adafisher", 3), ("adafisher", 4), ("sqrt", 3), ("sqrt", 4)
    ]
    sqrt = runs[2]
    assert sqrt.config == str(CONFIG_ROOT / "digits_adafisher.gin")
    assert sqrt.out == tmp_path / "out" / "sqrt" / "seed_3"
    # base, common bindings, variant items, seed, command-line bindings: later ones win
    assert sqrt.bindings == (
        "train.epochs = 2",
        f"include '{CONFIG_ROOT / 'ablations' / 'sqrt.gin'}'",
        "train.seed = 3",
        "train.batch_size = 32",
    )
    cmd = sqrt.command()
    assert cmd[1:4] == ["-m", "curvlab", "run"] and cmd[-3:] == ["--out", str(sqrt.out), "--quiet"]


def test_grid_without_base_uses_each_variants_first_config(tmp_path):
    grid = ablate.Grid({"official": ("adafisher_official.gin", "optimizer.lr = 0.01")}, (0,))
    (run,) = grid.runs(tmp_path)
    assert run.config == str(CONFIG_ROOT / "adafisher_official.gin")
    assert run.bindings == ("optimizer.lr = 0.01", "train.seed = 0")
    with pytest.raises(ValueError, match="no config"):
        ablate.Grid({"x": ("optimizer.lr = 1.0",)}).runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.gin"):
        ablate.Grid({"x": ("nope.gin",)}).runs(tmp_path)


@pytest.mark.parametrize(
    ("variants", "seeds", "match"),
    [({}, (0,), "empty"), ({"a/b": ()}, (0,), "must match"), ({"a": ()}, (1, 1), "distinct"),
     ({"a": "x.gin"}, (0,), "list")],
)
def test_grid_is_validated(variants, seeds, match):
    with pytest.raises(ValueError, match=match):
        ablate.Grid(variants, seeds)


def test_markdown_table_mean_and_sample_std():
    rows = [
        dict(variant="a", seed=0, status="ok", epoch=2, train_loss=1.0, test_loss=2.0,
             test_accuracy=0.9, train_time_s=1.0, time_s=1.5),
        dict(variant="a", seed=1, status="ok", epoch=2, train_loss=3.0, test_loss=2.0,
             test_accuracy=0.8, train_time_s=3.0, time_s=3.5),
        dict(variant="b", seed=0, status="missing", **dict.fromkeys(ablate.METRICS, "")),
    ]
    table = ablate.markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| variant | runs | test accuracy (%)")
    assert "| `a` | 2/2 | **85.00 ± 7.07** | 2.0000 ± 0.0000 | 2.0000 ± 1.4142 |" in lines[2]
    assert lines[3].startswith("| `b` | 0/1 | — |")


def test_a_diverged_run_reads_as_nan_in_tables_and_curves(tmp_path):
    """rundir writes a NaN loss as null: the report shows nan instead of stopping."""
    run = ablate.Run("a", 0, "c.gin", (), tmp_path / "a" / "seed_0")
    run.out.mkdir(parents=True)
    rows = [dict(epoch=e, train_loss=None, test_loss=None, test_accuracy=0.1, train_time_s=e,
                 time_s=e) for e in (1, 2)]
    rows[0]["train_loss"] = 2.5
    (run.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = ablate.read_history(run)
    assert history[0]["train_loss"] == 2.5 and math.isnan(history[1]["train_loss"])
    table = ablate.markdown_table([dict(variant="a", seed=0, status="ok", **rows[1])])
    assert "| `a` | 1/1 | **10.00 ± 0.00** | nan ± 0.0000 | nan ± 0.0000 |" in table
    assert math.isnan(ablate.metric("")) and ablate.metric("0.5") == 0.5


def finished(out: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/summary.json")}


@pytest.mark.slow
def test_grid_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    """2 variants × 2 seeds on digits, 2 epochs each; the second invocation runs nothing."""
    monkeypatch.chdir(CONFIG_ROOT.parent)  # the grid names configs/... relative to the repo
    grid_file, out = tmp_path / "grid.gin", tmp_path / "out"
    grid_file.write_text(GRID)
    argv = ["ablate", str(grid_file), "--out", str(out), "--jobs", "2", "--quiet"]
    assert cli.main(argv) == 0
    assert "4 runs (4 ran, 0 skipped, 0 failed)" in capsys.readouterr().out

    for run_dir in (out / v / f"seed_{s}" for v in ("adafisher", "sqrt") for s in (0, 1)):
        for name in ("metrics.jsonl", "operative_config.gin", "summary.json", "run.json"):
            assert (run_dir / name).is_file(), run_dir / name
        assert json.loads((run_dir / "summary.json").read_text())["epoch"] == 2
    assert "adafisher.power = 0.5" in (out / "sqrt" / "seed_1" / "operative_config.gin").read_text()

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("adafisher", "0", "ok"), ("adafisher", "1", "ok"), ("sqrt", "0", "ok"), ("sqrt", "1", "ok")
    ]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and r["epoch"] == "2" for r in rows)

    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table] == ["`adafisher`", "`sqrt`"]
    assert all(line.count("±") == 5 and "| 2/2 |" in line for line in table)
    assert "curvlab ablate" in md

    for stem in ("train_loss_vs_epoch", "test_accuracy_vs_epoch", "train_loss_vs_time",
                 "test_accuracy_vs_time"):
        png = out / f"{stem}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = finished(out)
    assert cli.main(argv) == 0
    assert "4 runs (0 ran, 4 skipped, 0 failed)" in capsys.readouterr().out
    assert finished(out) == before

    # a run whose bindings changed is stale: it runs again
    only_one = ["--bind", "ablate.variants = {'sqrt': ['ablations/sqrt.gin']}",
                "--bind", "ablate.seeds = [0]", "--run-bind", "train.epochs = 1"]
    assert cli.main([*argv, *only_one]) == 0
    assert "1 runs (1 ran, 0 skipped, 0 failed)" in capsys.readouterr().out
    assert json.loads((out / "sqrt" / "seed_0" / "summary.json").read_text())["epoch"] == 1
