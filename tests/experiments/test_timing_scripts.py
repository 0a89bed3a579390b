"""The 2-rank timing scripts run end to end through ``spawn_local_ranks``: their JSON holds both
variants, and the two variants trained the same parameters (the timing compares equal work)."""

import json

import pytest

from curvlab.experiments import sharded_solve_timing


@pytest.mark.slow  # two gloo ranks (≈ 10 s)
def test_sharded_solve_timing_runs_on_two_local_ranks(tmp_path):
    out = tmp_path / "sharded.json"
    argv = ["--out", str(out), "--width", "48", "--depth", "2", "--batch", "8", "--period", "2"]
    argv += ["--curvature-interval", "2", "--inverse-interval", "4", "--repeats", "1"]
    assert sharded_solve_timing.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["args"]["world"] == 2
    for variant in ("sharded", "gathered"):
        assert result[variant]["step"] > 0 and result[variant]["iter"] >= result[variant]["step"]
    # fp32, the same steps: only the order of the products' additions differs
    assert result["max_parameter_difference"] < 1e-5
