"""``curvlab analyze``: each paper analysis at tiny settings writes its figures and JSON, and its
key numbers are sane; the metric helpers and the Fisher-diagonal scaling on known cases."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab import cli
from curvlab.experiments import analyses


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pngs_written(out, names):
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _json(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


# -- helpers on known matrices --------------------------------------------------------------------
def test_concentration_metrics_on_known_matrices():
    m = analyses.concentration_metrics(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), draws=3)
    assert m["energy_fraction"] == pytest.approx(8 / 10)
    assert m["snr"] == pytest.approx(4.0)  # mean diag² 4, mean off-diag² 1
    assert m["snr_db"] == pytest.approx(10 * math.log10(4))
    assert m["dominant_rows"] == 1.0  # radius 0.5 < centre 1 after scaling by the mean diagonal
    assert m["median_radius_over_centre"] == pytest.approx(0.5)
    assert m["eig_min"] == pytest.approx(0.5) and m["eig_max"] == pytest.approx(1.5)
    assert 0 < m["shift"] <= m["weyl_bound"] + 1e-12

    d = analyses.concentration_metrics(torch.diag(torch.tensor([1.0, 2.0, 3.0])), draws=3)
    assert d["energy_fraction"] == 1.0 and d["snr"] == math.inf and d["dominant_rows"] == 1.0
    # a σ = 1e-3 symmetric off-diagonal perturbation moves the eigenvalues by at most ‖E‖₂
    assert d["shift"] <= d["weyl_bound"] + 1e-12 and d["relative_shift"] < 1e-2

    # the rank-one mean part of a non-negative input makes A far from diagonal; centring helps
    a = torch.rand(500, 20, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([a, torch.ones(500, 1)], 1)
    A = rows.T @ rows / 500
    raw = analyses.concentration_metrics(A)
    cov = analyses.concentration_metrics(analyses.centred_covariance(A))
    assert torch.allclose(analyses.centred_covariance(A), torch.cov(a.T, correction=0), atol=1e-5)
    assert raw["energy_fraction"] < 0.5 < cov["energy_fraction"]


def test_checkpoint_steps():
    assert analyses.checkpoint_steps(10, 4) == [1, 3, 7, 10]
    assert analyses.checkpoint_steps(2, 4) == [1, 2]
    with pytest.raises(ValueError):
        analyses.checkpoint_steps(0, 3)


def test_kronecker_diagonal_scaling_matches_backpack_for_one_sample():
    """The documented per-sample scaling N²·L·S⊗H: for a Linear layer and a batch of one sample
    the Kronecker-factored diagonal *is* the empirical Fisher diagonal (BackPACK's
    SumGradSquared); for a convolution with L positions it is the same order of magnitude."""
    torch.manual_seed(0)
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])

    def model_fn():
        return analyses.PlainCNN(width=2)

    state = model_fn().state_dict()
    ours = analyses.curvlab_fisher_diagonal(model_fn, state, x, y)
    refs = analyses.backpack_fisher_diagonals(model_fn, state, x, y)
    assert set(ours) == {"0", "2", "6"}
    for role in ("weight", "bias"):
        torch.testing.assert_close(ours["6"][role], refs["empirical"]["6"][role],
                                   rtol=1e-5, atol=1e-9)
    for name in ("0", "2"):
        ratio = analyses._flat(ours[name]).sum() / analyses._flat(refs["empirical"][name]).sum()
        assert 0.1 < ratio.item() < 10
    # BackPACK's exact GGN diagonal is on the same (per-sample average) scale
    err = analyses.mae(ours["6"], refs["exact"]["6"])
    assert math.isfinite(err["mae"]) and err["relative_mae"] < 2


def test_loss_surface_matches_the_model_at_its_own_coordinates():
    torch.manual_seed(0)
    model = analyses.IrisMLP()
    x, y = torch.randn(20, 2), torch.randint(0, 3, (20,))
    w = model[0].weight.detach()
    a = torch.tensor([w[0, 0].item(), w[0, 0].item() + 0.5])
    b = torch.tensor([w[0, 1].item(), 0.0, 1.0])
    Z = analyses.loss_surface(model, x, y, a, b)
    assert Z.shape == (3, 2)
    with torch.no_grad():
        assert Z[0, 0].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
        model[0].weight[0, 0] += 0.5
        model[0].weight[0, 1] = 1.0
        assert Z[2, 1].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


# -- each analysis, tiny settings -----------------------------------------------------------------
def test_diagonal_concentration_tiny(tmp_path):
    r = analyses.run("diagonal-concentration", tmp_path, steps=3, quiet=True, width=4,
                     checkpoints=2, noise_draws=2)
    assert r["config"]["checkpoints"] == [1, 3]
    _pngs_written(tmp_path, ["concentration.png", "factors_final.png",
                             "gershgorin_step1.png", "gershgorin_step3.png"])
    saved = _json(tmp_path)
    assert saved["figures"] == r["figures"] and len(saved["checkpoints"]) == 2
    assert set(saved["final"]) == {"0", "3", "8"}  # Conv2d, Conv2d, Linear of the digits CNN
    for row in saved["checkpoints"]:
        for name, layer in row["layers"].items():
            for f in ("A", "G", "A_cov"):
                m = layer[f]
                assert 0.0 <= m["energy_fraction"] <= 1.0, (name, f)
                assert m["snr"] is None or m["snr"] > 0  # None: inf in JSON (diagonal factor)
                assert 0.0 <= m["dominant_rows"] <= 1.0
                assert m["shift"] <= m["weyl_bound"] * (1 + 1e-9) + 1e-12  # Weyl's inequality
                assert m["relative_shift"] < 0.05, (name, f)  # σ = 1e-3 moves little
    assert saved["final"]["8"]["A"]["dim"] == 8 * 16 + 1
    assert saved["final"]["3"]["A"]["dim"] == 4 * 9 + 1


def test_diagonal_accuracy_tiny(tmp_path):
    r = analyses.run("diagonal-accuracy", tmp_path, steps=2, quiet=True, width=2, eval_batch=16,
                     checkpoints=3)
    assert r["config"]["checkpoints"] == [0, 1, 2]
    _pngs_written(tmp_path, ["mae_over_training.png", "diagonal_scatter_final.png"])
    saved = _json(tmp_path)
    assert [row["step"] for row in saved["checkpoints"]] == [0, 1, 2]
    assert saved["config"]["layers"]["0"]["positions"] == 64  # 8×8 outputs, padding 1
    assert saved["config"]["layers"]["6"]["positions"] == 1
    for row in saved["checkpoints"]:
        for layer in row["layers"].values():
            for ref in ("exact", "mc", "empirical"):
                e = layer["batch"][ref]
                assert math.isfinite(e["mae"]) and e["mae"] >= 0
                assert 0 <= e["relative_mae"] < 5
    # the optimizer's EMA exists only after its first step
    assert saved["checkpoints"][0]["layers"]["6"]["ema"]["exact"]["mae"] is None
    assert math.isfinite(saved["checkpoints"][-1]["layers"]["6"]["ema"]["exact"]["mae"])


def test_trajectories_tiny(tmp_path):
    r = analyses.run("trajectories", tmp_path, steps=4, quiet=True, grid=12)
    _pngs_written(tmp_path, ["trajectories.png", "trajectories_overlay.png"])
    saved = _json(tmp_path)
    assert list(saved["optimizers"]) == ["AdaFisher", "Adam", "K-FAC", "SGD"]
    kfac = saved["optimizers"]["K-FAC"]["parts"]  # built from configs/kfac.gin
    assert "KFACUpdate" in kfac["update_rule"] and "Full" in kfac["estimator"]
    starts = {tuple(p[0]) for p in saved["paths"].values()}
    assert len(starts) == 1  # the same initialisation for every optimizer
    for name, o in saved["optimizers"].items():
        assert len(saved["paths"][name]) == 5
        assert math.isfinite(o["final_train_loss"]) and o["path_length"] >= o["displacement"] > 0
    assert len(r["config"]["pca_explained_variance_ratio"]) == 2


def test_curvature_range_tiny(tmp_path):
    """Official F/λ: 7.40–8.74 after the 1st curvature update, within [1, 1.08] after the 3rd;
    paper F/λ ∈ [1, 1 + 1/λ)."""
    analyses.run("curvature-range", tmp_path, steps=9, quiet=True, width=4, official_interval=2)
    _pngs_written(tmp_path, ["range_over_steps.png", "histograms.png"])
    saved = _json(tmp_path)
    official, paper = saved["variants"]["official"], saved["variants"]["paper"]
    assert [u["step"] for u in official["per_update"]] == [1, 3, 5, 7, 9]
    first = official["per_update"][0]
    assert 7.39 <= first["min"] and first["max"] <= 8.75
    second = official["per_update"][1]
    assert 1.0 <= second["min"] and second["max"] <= 1.25
    after = official["range_after_third_update"]
    assert 1.0 - 1e-6 <= after["min"] and after["max"] <= 1.08
    for u in official["per_update"]:
        for layer in u["minmax_max"].values():
            assert all(0.0 <= v < 1.0 for v in layer.values())
    lam = paper["damping"]
    assert paper["updates"] == 9
    assert 1.0 - 1e-6 <= paper["range_all_steps"]["min"]
    assert paper["range_all_steps"]["max"] < 1 + 1 / lam
    assert paper["range_all_steps"]["max"] > 10 * official["range_all_steps"]["max"]


def test_cli_analyze(tmp_path, capsys):
    out = tmp_path / "traj"
    code = cli.main(["analyze", "trajectories", "--steps", "2", "--out", str(out), "--quiet",
                     "--set", "grid=8", "--set", "learning_rates={'Adam': 0.01}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trajectories:" in printed and "AdaFisher: loss" in printed
    saved = _json(out)
    assert saved["config"]["learning_rates"]["Adam"] == 0.01
    with pytest.raises(SystemExit, match="KEY one of"):
        cli.main(["analyze", "trajectories", "--out", str(out), "--set", "nope=1"])


def test_unknown_analysis_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown analysis"):
        analyses.run("nope", tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["analyze", "nope"])


def test_plain_cnn_has_no_batchnorm():
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in analyses.PlainCNN().modules())
