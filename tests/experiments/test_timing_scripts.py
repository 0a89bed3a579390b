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


def test_step_phases_times_each_phase_of_every_optimizer(tmp_path):
    """One step of each optimizer in turn on the quick MLP: 12 steps are one refresh (step 0),
    one curvature step (10) and 10 plain steps; the period mean is the medians' weighted sum."""
    from curvlab.experiments import step_phases

    out = tmp_path / "phases.json"
    argv = ["--model", "mlp", "--size", "quick", "--steps", "12"]
    assert step_phases.main([*argv, "--optimizers", "kfac_c10_i100,adam", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for name in ("kfac_c10_i100", "adam"):
        entry = result["optimizers"][name]
        assert entry["count"] == {"refresh": 1, "plain": 10, "curvature": 1}
        assert len(entry["times_ms"]) == 12 and min(entry["times_ms"]) > 0
        m = entry["median_ms"]
        assert entry["period_mean_ms"] == pytest.approx(
            (90 * m["plain"] + 9 * m["curvature"] + m["refresh"]) / 100
        )
    assert step_phases.main([*argv, "--optimizers", "kfac_c10_i100,nope"]) == 2
