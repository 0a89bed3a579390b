"""Shared helpers of the fault-injection tests: run the command line, check one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIGITS = "configs/digits_adafisher.gin"
NAN_PLUGIN = str(REPO / "tests" / "faults" / "nan_data.py")


def env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: one thread (2 shared cores), this checkout first."""
    out = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    out.update(extra)
    return out


def curvlab(*args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m curvlab ARGS`` in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "curvlab", *args],
        cwd=REPO,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    """A non-zero exit, and stderr is one line ``error: ...`` holding every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
