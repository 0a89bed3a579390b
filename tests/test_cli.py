"""The ``curvlab`` command line: ``curvlab run CONFIG.gin`` and the console entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest

from curvlab import cli
from curvlab.config import CONFIG_ROOT

DIGITS = "configs/digits_adafisher.gin"
METRIC_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "time_s"}


def read_run(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    summary = json.loads((out / "summary.json").read_text())
    operative = (out / "operative_config.gin").read_text()
    return metrics, summary, operative


def test_run_writes_metrics_summary_and_operative_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "run",
            DIGITS,
            "--out",
            str(out),
            "--quiet",
            "--bind",
            "train.epochs=2",
            "--bind",
            "optimizer.lr=0.002",
        ]
    )
    assert code == 0
    metrics, summary, operative = read_run(out)

    assert len(metrics) == 2  # one JSON line per epoch
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) >= METRIC_KEYS
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["train_loss"] > 0 and m["time_s"] > 0
    assert metrics[1]["time_s"] >= metrics[0]["time_s"]
    coverage = summary.pop("coverage")  # curvlab optimizers add their curvature coverage
    assert coverage["share"] == 1.0 and coverage["fallback"] == []
    assert summary == metrics[-1]
    assert summary["test_accuracy"] > 0.5  # it learns something in two epochs

    # the operative config names the optimizer's parts and the bound values
    for fragment in (
        "optimizer.adapters",
        "optimizer.estimator = 'diagonal'",
        "optimizer.normalizer = 'minmax'",
        "optimizer.update_rule = 'adafisher'",
        "optimizer.backend = 'native'",
        "optimizer.reducer = 'none'",
        "optimizer.damping = 0.001",
        "optimizer.ema = 'paper'",
        "optimizer.lr = 0.002",
        "train.epochs = 2",
    ):
        assert fragment in operative, fragment

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("final:")  # --quiet: the final line only
    assert "test_accuracy=" in printed[-1]


def test_run_without_out_writes_no_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        cli.main(
            [
                "run",
                str(CONFIG_ROOT / "digits_adafisher.gin"),
                "--quiet",
                "--bind",
                "train.epochs=1",
            ]
        )
        == 0
    )
    assert list(tmp_path.iterdir()) == []
    assert "final:" in capsys.readouterr().out


@pytest.mark.slow
def test_full_digits_run_reaches_95_percent_within_a_minute(tmp_path):
    start = time.perf_counter()
    assert cli.main(["run", DIGITS, "--out", str(tmp_path), "--quiet"]) == 0
    wall = time.perf_counter() - start
    metrics, summary, _ = read_run(tmp_path)
    assert len(metrics) == 15
    assert summary["test_accuracy"] >= 0.95, summary
    assert wall < 60.0, f"{wall:.1f} s"


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["run"])  # the config is required
    assert info.value.code == 2
    capsys.readouterr()
    # a missing config: one line naming it and the available ones; --debug raises instead
    assert cli.main(["run", "configs/no_such_config.gin", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file 'configs/no_such_config.gin' not found")
    assert "digits_adafisher.gin" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="digits_adafisher.gin"):
        cli.main(["run", "configs/no_such_config.gin", "--quiet", "--debug"])


def test_console_script_is_installed():
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "curvlab"]
    assert len(scripts) == 1
    assert scripts[0].value == "curvlab.cli:main"
    assert scripts[0].load() is cli.main


def test_python_m_curvlab_help():
    result = subprocess.run(
        [sys.executable, "-m", "curvlab", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout
    executable = shutil.which("curvlab")
    if executable is not None:  # the script itself, when its directory is on PATH
        result = subprocess.run(
            [executable, "run", "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "--bind" in result.stdout and "--out" in result.stdout
