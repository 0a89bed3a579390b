"""experiments/kfac_precision.py: the fp32-vs-float64 report of K-FAC's inverse solve."""

from __future__ import annotations

import pytest

from curvlab.experiments import kfac_precision
from curvlab.kronecker_inverse import KAPPA_FP32


@pytest.mark.filterwarnings("ignore::curvlab.optimizer.CurvatureFallbackWarning")
def test_report_on_the_quick_mlp(tmp_path):
    result = kfac_precision.measure("mlp", steps=2, size="quick")
    assert [e["layer"] for e in result["layers"]] == ["1", "3"]
    for entry in result["layers"]:
        assert entry["kappa_H"] >= 1 and entry["kappa_S"] >= 1
        assert not entry["fp32_cholesky_failed"]
        # κ·ε₃₂ bounds the error of the fp32 solve; well-conditioned factors stay in fp32
        assert entry["fp32_relative_error"] < 100 * 6e-8 * max(entry["kappa_H"], entry["kappa_S"])
        if max(entry["kappa_H"], entry["kappa_S"]) < KAPPA_FP32 / 10:
            assert entry["solver_precision"] == "float32"
    assert (
        kfac_precision.main(
            [
                "--models",
                "mlp",
                "--size",
                "quick",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert (tmp_path / "p.json").read_text().startswith("{")
