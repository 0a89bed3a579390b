"""``curvlab bench``: a short CPU smoke run (tiny MLP, two optimizers, a few steps) that checks
the JSON it writes — its schema, not the speed."""

from __future__ import annotations

import json

import pytest
import torch

from curvlab.cli import main as cli_main
from curvlab.experiments import bench

STATS = ("steps", "median_ms", "mean_ms", "std_ms", "min_ms", "max_ms")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "bench", "--quick", "--quiet", "--models", "mlp", "--devices", "cpu",
        "--optimizers", "adam,adafisher_k10", "--steps", "3", "--rounds", "2", "--warmup", "1",
        "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return json.loads(out.read_text())


def test_report_header(report):
    assert report["schema"] == bench.SCHEMA
    assert report["command"].startswith("curvlab bench --quick")
    assert "--optimizers adam,adafisher_k10" in report["command"]
    assert isinstance(report["torch"], str) and report["threads"] == 1
    assert set(report["git"]) == {"commit", "dirty"}
    for key in ("load_average_start", "load_average_end"):
        assert report[key] is None or (len(report[key]) == 3 and all(map(_is_number, report[key])))
    assert report["devices"]["cpu"]["type"] == "cpu" and report["devices"]["cpu"]["name"]
    assert report["settings"]["steps"] == 3 and report["settings"]["rounds"] == 2
    assert report["settings"]["reset_weights_each_round"] is True
    assert isinstance(report["settings"]["flush_denormal"], bool)
    assert _is_number(report["wall_s"])


def test_results_schema(report):
    (res,) = report["results"]
    assert res["model"] == "mlp" and res["device"] == "cpu" and res["size"] == "quick"
    assert res["batch_size"] > 0 and res["parameters"] > 0
    assert set(res["optimizers"]) == {"adam", "adafisher_k10"}
    for name, e in res["optimizers"].items():
        for key in STATS:
            assert _is_number(e[key]), (name, key)
        assert len(e["times_ms"]) == e["steps"]
        assert e["min_ms"] <= e["median_ms"] <= e["max_ms"]
        assert e["min_ms"] <= e["mean_ms"] <= e["max_ms"]
        assert _is_number(e["ratio_median"]) and _is_number(e["ratio_mean"])
        assert e["peak_memory_mib"] is None or _is_number(e["peak_memory_mib"])
        assert isinstance(e["memory_method"], str)
        assert e["ratio_memory"] is None or _is_number(e["ratio_memory"])
    adam, af = res["optimizers"]["adam"], res["optimizers"]["adafisher_k10"]
    assert adam["ratio_median"] == 1.0 and adam["ratio_mean"] == 1.0
    assert adam["period"] == 1 and adam["steps"] == 3
    # an interval setting is timed over a whole number of its periods
    assert af["period"] == 10 and af["steps"] == 10
    assert af["config"]["curvature_interval"] == 10 and af["skipped_steps"] == 0


def test_markdown_table_lists_every_optimizer(report):
    table = bench.markdown_table(report)
    assert "| adam | 1 | 3 |" in table and "| adafisher_k10 | 10 | 10 |" in table


def test_helpers():
    assert bench.measured_steps(20, 1) == 20
    assert bench.measured_steps(20, 100) == 100
    assert bench.measured_steps(25, 10) == 30
    assert bench.split_steps(10, 3) == [4, 3, 3] and sum(bench.split_steps(100, 5)) == 100
    assert bench.selected("kfac", "resnet50", ["resnet50:kfac"]) is not None
    assert bench.selected("banded", "gpt", ["*:banded"]) is not None
    assert bench.selected("adam", "gpt", ["*:banded"]) is None
    assert bench.selected("adafisherw", "mlp", []) is not None  # GPT only


def test_denormal_flushing_is_restored(report):
    """The in-process run above must not leave flush-to-zero on for the rest of the tests."""
    tiny = torch.tensor(1e-40, dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0


def test_unknown_names_are_reported(tmp_path):
    with pytest.raises(SystemExit, match="unknown optimizer"):
        cli_main(["bench", "--quick", "--optimizers", "adamx", "--out", str(tmp_path / "x.json")])
