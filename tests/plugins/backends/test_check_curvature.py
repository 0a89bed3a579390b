"""``curvlab check-curvature``: the table, PASS/FAIL, a researcher's own estimator plugin."""

from __future__ import annotations

import textwrap

import pytest

from curvlab.cli import main as cli
from curvlab.experiments.check_curvature import available_backends

pytestmark = pytest.mark.skipif(not available_backends(), reason="needs backpack or asdl")

PLUGIN = textwrap.dedent(
    '''
    """A researcher's diagonal estimator: squares of the adapters' explicit rows (a different code
    path from the built-in window sums), optionally with a deliberate bug in S."""
    from torch import nn

    from curvlab.interfaces.adapter import Statistic
    from curvlab.interfaces.estimator import FactorEstimator
    from curvlab.registry import register


    class RowSquares(FactorEstimator):
        structure = "diagonal"
        s_factor = 1.0

        def input_statistic(self, adapter, module, x, output, dtype):
            try:
                rows = adapter.input_rows(module, x).to(dtype)
            except NotImplementedError:  # normalisation layers: the adapter's own diagonal
                return adapter.input_diagonal(module, x, output, dtype)
            rows = rows.reshape(-1, rows.shape[-2], rows.shape[-1])  # (groups, R, d)
            total = (rows * rows).sum(1)
            return Statistic(total[0] if isinstance(module, nn.Linear) else total, rows.shape[1])

        def output_statistic(self, adapter, module, grad_output, dtype):
            try:
                rows = adapter.output_rows(module, grad_output).to(dtype)
            except NotImplementedError:
                stat = adapter.output_diagonal(module, grad_output, dtype)
                return Statistic(stat.total * self.s_factor, stat.count)
            return Statistic((rows * rows).sum(0) * self.s_factor, rows.shape[0])


    @register("estimators", "test_row_squares")
    class Good(RowSquares):
        pass


    @register("estimators", "test_row_squares_buggy")
    class Buggy(RowSquares):
        s_factor = 2.0  # e.g. a forgotten 1/2
    '''
)


def run(capsys, *args: str) -> tuple[int, str]:
    code = cli(["check-curvature", *args])
    return code, capsys.readouterr().out


def test_mlp_config_all_fisher_types(capsys):
    code, out = run(
        capsys, "configs/digits_mlp_backpack.gin", "--batch-size", "12", "--fisher-type", "all"
    )
    assert code == 0, out
    lines = [line for line in out.splitlines() if line[:1].isdigit() and "Linear" in line]
    assert len(lines) == 3 * 3 * len(available_backends())  # layers × Fisher types × backends
    assert all(" PASS " in line for line in lines)
    assert " 0 FAIL/ERROR" in out and " FAIL " not in out


def test_batchnorm_cnn_reports_unsupported_layers(capsys):
    code, out = run(
        capsys,
        "configs/digits_adafisher.gin",
        "--batch-size",
        "8",
        "--bind",
        "models.digits_cnn.width=4",
    )
    assert code == 0, out
    if "backpack" in available_backends():
        assert "BatchNorm2d  backpack  empirical" in out and "BatchNorm only in eval mode" in out
    assert out.count("Conv2d") >= 2 * len(available_backends())


def test_researcher_estimator_plugin(tmp_path, capsys):
    plugin = tmp_path / "row_squares_plugin.py"
    plugin.write_text(PLUGIN)
    common = [
        "configs/digits_adafisher.gin",
        "--batch-size",
        "8",
        "--plugin",
        str(plugin),
        "--bind",
        "models.digits_cnn.width=4",
    ]
    code, out = run(capsys, *common, "--bind", 'optimizer.estimator="test_row_squares"')
    assert code == 0, out
    assert "estimator Good()" in out and out.count(" PASS ") >= 3
    code, out = run(capsys, *common, "--bind", 'optimizer.estimator="test_row_squares_buggy"')
    assert code == 1
    fails = [line for line in out.splitlines() if " FAIL " in line]
    assert fails and all("1.0e+00" in line or "5.0e-01" in line for line in fails)


CONV_FAMILY_PLUGIN = textwrap.dedent(
    '''
    """A digits model with Conv1d, Conv3d, ConvTranspose2d and a padding="same" Conv1d."""
    import gin
    import torch
    from torch import nn


    class ConvFamily(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = nn.Conv1d(8, 4, 3, padding=1)
            self.same = nn.Conv1d(4, 2, 4, padding="same")
            self.volume = nn.Conv3d(1, 2, 2, stride=(1, 1, 2))
            self.up = nn.ConvTranspose2d(1, 2, 2, stride=2, dilation=1)
            self.out = nn.Linear(2 * 8 + 2 * 3 * 1 * 4 + 2 * 16 * 16, 10)

        def forward(self, x):
            n = x.shape[0]
            a = self.same(torch.relu(self.rows(x.reshape(n, 8, 8))))
            b = self.volume(x.reshape(n, 1, 4, 2, 8))
            c = self.up(x)
            return self.out(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], 1).tanh())


    @gin.configurable(module="models")
    def test_conv_family():
        return ConvFamily()
    '''
)


@pytest.mark.skipif("backpack" not in available_backends(), reason="needs backpack")
def test_conv_family_against_backpack(tmp_path, capsys):
    plugin = tmp_path / "conv_family_plugin.py"
    plugin.write_text(CONV_FAMILY_PLUGIN)
    config = tmp_path / "conv_family.gin"
    config.write_text(
        'include "adafisher.gin"\n'
        "train.model = @models.test_conv_family\n"
        "train.data = @data.digits\n"
        "train.batch_size = 8\n"
    )
    code, out = run(capsys, str(config), "--plugin", str(plugin), "--backend", "backpack")
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if "  backpack  " in line}
    for name, kind in (("rows", "Conv1d"), ("volume", "Conv3d"), ("up", "ConvTranspose2d")):
        assert f" {kind} " in rows[name] and " PASS " in rows[name], out
    assert " n/a " in rows["same"] and "padding='same'" in rows["same"]
    assert " PASS " in rows["out"]
