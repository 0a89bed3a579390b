"""``curvlab bench`` additions (experiments/bench_baselines.py): ASDL's K-FAC baseline really
preconditions with ASDL's inverses, and the K-FAC / banded rows run at curvature 10 /
inverse 100 over whole periods."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.cli import main as cli_main
from curvlab.experiments import bench, bench_baselines

pytestmark = pytest.mark.skipif(
    not bench_baselines.asdl_available(), reason="asdl (PyPI asdfghjkl) is not installed"
)


def test_asdl_step_is_sgd_on_gradients_preconditioned_by_asdl_inverses():
    """Step 0 is a curvature and inverse step: the update is −lr · B⁻¹ ∇W A⁻¹ (bias: B⁻¹ ∇b)
    with ASDL's own damped inverses, on the gradient of the mean loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(reference(x), y).backward()
    opt = bench_baselines.AsdlKfac(model, lr=0.1)
    assert (opt.curvature_interval, opt.inverse_interval) == (10, 100)
    opt.train_step(model, x, y, None)
    for layer, ref in zip((model[0], model[2]), (reference[0], reference[2])):
        kron = layer.fisher.kron
        expected_w = ref.weight - 0.1 * kron.B_inv @ ref.weight.grad @ kron.A_inv
        expected_b = ref.bias - 0.1 * kron.B_inv @ ref.bias.grad
        torch.testing.assert_close(layer.weight, expected_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias, expected_b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(layer.weight, ref.weight - 0.1 * ref.weight.grad)


def test_rows_and_workloads_are_registered_but_not_run_by_default():
    for name in ("asdl_kfac", "kfac_c10_i100", "kfac_eigen_c10_i100", "banded_c10_i100"):
        assert name in bench.OPTIMIZERS and name not in bench.DEFAULT_OPTIMIZERS
    assert bench.WORKLOADS["resnet18_b16"]["cpu"]().batch_size == 16
    assert bench.OPTIMIZERS["asdl_kfac"].models == bench_baselines.ASDL_MODELS


@pytest.mark.slow
def test_quick_benchmark_times_whole_periods(tmp_path):
    out = tmp_path / "bench.json"
    names = "adam,asdl_kfac,kfac_c10_i100,banded_c10_i100"
    argv = [
        "bench", "--quick", "--quiet", "--models", "mlp", "--optimizers", names,
        "--steps", "1", "--rounds", "1", "--warmup", "0", "--memory-steps", "0",
        "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    for name in names.split(",")[1:]:
        entry = result["optimizers"][name]
        assert entry["period"] == 100 and entry["steps"] == 100, name
        assert entry["ratio_mean"] > 0
    assert result["optimizers"]["kfac_c10_i100"]["config"]["inverse_interval"] == 100
    assert "SGD" in result["optimizers"]["asdl_kfac"]["label"]
