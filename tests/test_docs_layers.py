"""docs/layers.md: the register_layer example runs and its numbers are right; the measured
tables are what the code gives; links resolve."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab

from .test_docs_example import code_blocks, github_anchor

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "layers.md"
DT = torch.float64


@pytest.fixture
def clean_mappings():
    from curvlab import layers, registry

    registry.load_builtin_plugins()  # the built-in mappings are registered by the plugins
    saved = dict(layers._MAPPINGS)
    yield
    layers._MAPPINGS.clear()
    layers._MAPPINGS.update(saved)


def run_example() -> tuple[dict, str, str]:
    (block,) = code_blocks(DOC.read_text(), "python")
    namespace: dict = {"__name__": "curvlab_docs_layers_md"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "docs/layers.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace, block, printed.getvalue()


def test_example_runs_and_prints_what_it_says(clean_mappings):
    namespace, block, printed = run_example()
    claimed = re.search(r"^# (curvature coverage .*)$", block, flags=re.M).group(1)
    assert printed.strip() == claimed


def test_example_layers_get_the_curvature_of_their_torch_twins(clean_mappings):
    namespace, _, _ = run_example()
    Dense, ScaledRMSNorm = namespace["Dense"], namespace["ScaledRMSNorm"]  # noqa: N806
    torch.manual_seed(0)
    mine = nn.Sequential(
        Dense(8, 16), ScaledRMSNorm(16, epsilon=1e-5), nn.GELU(), nn.Linear(16, 4)
    ).double()
    with torch.no_grad():
        mine[1].scale.copy_(torch.linspace(0.5, 1.5, 16))
    twin = nn.Sequential(
        nn.Linear(8, 16), nn.RMSNorm(16, eps=1e-5), nn.GELU(), nn.Linear(16, 4)
    ).double()
    with torch.no_grad():
        twin[0].weight.copy_(mine[0].weight.t())
        twin[0].bias.copy_(mine[0].bias)
        twin[1].weight.copy_(mine[1].scale)
        twin[3].load_state_dict(mine[3].state_dict())
    opts = [curvlab.AdaFisherW(m, lr=1e-2, fallback="error") for m in (mine, twin)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(12, 8, generator=g, dtype=DT), torch.randint(0, 4, (12,), generator=g)
        for m, opt in zip((mine, twin), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    mine_opt, twin_opt = opts
    pairs = [
        (mine[0].weight, twin[0].weight.t()),
        (mine[0].bias, twin[0].bias),
        (mine[1].scale, twin[1].weight),
    ]
    for p, q in pairs:
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        mine_opt.preconditioner(mine[0].weight),
        twin_opt.preconditioner(twin[0].weight).t(),
        rtol=1e-12,
        atol=1e-15,
    )
    torch.testing.assert_close(
        mine_opt.preconditioner(mine[1].scale),
        twin_opt.preconditioner(twin[1].weight),
        rtol=1e-12,
        atol=1e-15,
    )


def table_between(marker: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, flags=re.S)
    assert match, marker
    return match.group(1).strip()


@pytest.mark.slow
def test_coverage_table_is_what_the_code_gives():
    pytest.importorskip("transformers")
    from curvlab.experiments.layer_coverage import coverage_table

    assert table_between("coverage-table") == coverage_table()


def test_lstm_table_is_the_recorded_study():
    from curvlab.experiments.layer_coverage import lstm_table

    results = ROOT / "docs" / "results" / "layers" / "lstm" / "results.json"
    rows = json.loads(results.read_text())
    assert [r["optimizer"] for r in rows] == ["identity", "squared_gradient", "adamw"]
    assert table_between("lstm-table") == lstm_table(rows)


def test_links_and_anchors_resolve():
    for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]*))?\)", DOC.read_text()):
        resolved = DOC.parent / target
        assert resolved.exists(), target
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"no #{anchor} in {target}"
    # and the pages that link here
    for page, anchor in (
        ("plugins.md", "mapping-your-own-layer-class"),
        ("architecture.md", "fallback-rules"),
    ):
        assert f"layers.md#{anchor}" in (DOC.parent / page).read_text()
