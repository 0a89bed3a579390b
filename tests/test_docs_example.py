"""The worked plugin example of docs/plugins.md (docs/examples/block_diagonal_estimator.py).

* block_size = 1 is the diagonal estimator: the same trajectory and preconditioner (AdaFisher and
  K-FAC parts) — through the eigenbasis solve, since the example always stores "full" factors;
* block_size ≥ d is the full estimator (``per_sample=False``);
* an intermediate block size differs from both;
* the gin config and ``plugins=[...]`` load it, bindings reach it, Python constructors do not;
* the code blocks in docs/plugins.md are the files, verbatim; the docs' snippets run; their
  relative links and anchors resolve.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab
from curvlab import registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "block_diagonal_estimator.py"
EXAMPLE_GIN = ROOT / "docs" / "examples" / "block_diagonal_adafisher.gin"
DT = torch.float64


@pytest.fixture(scope="module")
def BlockDiagonal():  # noqa: N802 - a class
    registry.load_plugin_file(EXAMPLE)
    return registry.lookup("estimators", "block_diagonal")


def net() -> nn.Sequential:
    """Conv (with and without bias: d = 18+1 and 12), Linear, LayerNorm (diagonal), Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    ).to(DT)


def batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 2, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n)
    ]


KFAC_PARTS = dict(normalizer="identity", damping="factored", update_rule="kfac", gamma=0.9)


def train(estimator, **parts):
    torch.manual_seed(0)
    model = net()
    opt = curvlab.CurvatureOptimizer(model, lr=1e-3, estimator=estimator, **parts)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def assert_same_training(a, b, rtol=1e-10):
    (m_a, o_a), (m_b, o_b) = a, b
    for (name, p), q in zip(m_a.named_parameters(), m_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-13, msg=name)
        torch.testing.assert_close(
            o_a.preconditioner(p), o_b.preconditioner(q), rtol=rtol, atol=1e-13, msg=name
        )


def test_second_moment_is_the_masked_full_second_moment(BlockDiagonal):
    g = torch.Generator().manual_seed(1)
    for groups, d in ((1, 7), (2, 6), (3, 5)):
        rows = torch.randn(groups, 20, d, generator=g, dtype=DT)
        full = rows.transpose(1, 2) @ rows
        i = torch.arange(d)
        for k in (1, 2, 3, d, d + 4):
            mask = (i[:, None] // k) == (i[None, :] // k)
            got = BlockDiagonal(block_size=k).second_moment(rows)
            torch.testing.assert_close(got, full * mask, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("parts", [{}, KFAC_PARTS], ids=["adafisher", "kfac"])
def test_block_size_one_is_the_diagonal_estimator(BlockDiagonal, parts):
    diagonal = train("diagonal", **parts)
    blocks = train(BlockDiagonal(block_size=1), **parts)
    assert blocks[1].layers[0].structure == "full"  # really the eigenbasis path
    assert_same_training(diagonal, blocks)


@pytest.mark.parametrize("normalizer", ["minmax", "identity"])
def test_block_size_at_least_d_is_the_full_estimator(BlockDiagonal, normalizer):
    full = train(registry.create("estimators", "full", per_sample=False), normalizer=normalizer)
    blocks = train(BlockDiagonal(block_size=1000), normalizer=normalizer)
    assert_same_training(full, blocks)
    for name, state in full[1].curvature_state.items():
        for key in ("H", "S"):
            torch.testing.assert_close(
                blocks[1].curvature_state[name][key], state[key], rtol=1e-12, atol=1e-15
            )


def test_intermediate_block_size_differs_from_both_ends(BlockDiagonal):
    first = [
        list(train(e)[0].parameters())[0]
        for e in (
            "diagonal",
            BlockDiagonal(block_size=4),
            registry.create("estimators", "full", per_sample=False),
        )
    ]
    assert not torch.allclose(first[0], first[1], rtol=1e-6, atol=0)
    assert not torch.allclose(first[1], first[2], rtol=1e-6, atol=0)


def test_invalid_block_size_is_rejected(BlockDiagonal):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            BlockDiagonal(block_size=bad)


def test_gin_config_and_plugins_argument(BlockDiagonal):
    model = net()
    opt = curvlab.build_optimizer(model, EXAMPLE_GIN, plugins=[EXAMPLE])
    assert isinstance(opt.estimator, BlockDiagonal)
    assert opt.estimator.block_size == 4  # from the .gin file
    assert {r.name: r.structure for r in opt.layers} == {
        "0": "full",
        "2": "full",
        "4": "full",
        "5": "diagonal",
        "6": "full",
    }
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.curvature_state["0"]["H"].shape == (1, 19, 19)

    opt = curvlab.build_optimizer(
        net(),
        "docs/examples/block_diagonal_adafisher.gin",  # relative to the repository, from any cwd
        bindings=["estimators.block_diagonal.block_size = 2"],
        plugins=[str(EXAMPLE)],
    )
    assert opt.estimator.block_size == 2
    # a Python constructor never picks up gin bindings
    assert BlockDiagonal().block_size == 16


def _runner_has_plugins_flag() -> bool:
    from curvlab.experiments import runner

    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return any("--plugins" in action.option_strings for action in parser._actions)


def test_cli_run_with_plugins_flag(tmp_path, capsys):
    if not _runner_has_plugins_flag():
        pytest.skip("curvlab run has no --plugins flag in this build")
    from curvlab import cli

    code = cli.main(
        [
            "run",
            "configs/digits_adafisher.gin",
            "--quiet",
            "--plugins",
            str(EXAMPLE),
            "--bind",
            "optimizer.estimator = @estimators.block_diagonal()",
            "--bind",
            "estimators.block_diagonal.block_size = 8",
            "--bind",
            "train.epochs = 1",
            "--bind",
            "models.digits_cnn.width = 8",
        ]
    )
    assert code == 0
    assert "test_accuracy=" in capsys.readouterr().out


# -- the docs show the real files, and their snippets run ----------------------------------------
def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


def test_plugins_md_shows_the_example_files_verbatim():
    text = (ROOT / "docs" / "plugins.md").read_text()
    assert EXAMPLE.read_text() in code_blocks(text, "python")
    assert EXAMPLE_GIN.read_text() in code_blocks(text, "gin")


def test_plugins_md_snippets_run(BlockDiagonal, monkeypatch):
    """The usage, custom-adapter and custom-update-rule snippets, in order, from the repository
    root (each ends with its own assertion)."""
    monkeypatch.chdir(ROOT)
    blocks = code_blocks((ROOT / "docs" / "plugins.md").read_text(), "python")
    snippets = [b for b in blocks if b != EXAMPLE.read_text()]
    assert len(snippets) == 3
    namespace = {"__name__": "curvlab_docs_plugins_md"}
    for code in snippets:
        exec(compile(code, "docs/plugins.md", "exec"), namespace)  # noqa: S102 - our own docs

    # the LayerScale adapter: with one row, curvature(H, S) is the squared gradient of γ
    m = namespace["LayerScale"](4).to(DT)
    adapter = namespace["LayerScaleAdapter"]()
    x = torch.randn(1, 4, dtype=DT)
    out = m(x)
    s = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, [m.gamma], s)
    H, S = adapter.input_diagonal(m, x, out, DT), adapter.output_diagonal(m, s, DT)
    torch.testing.assert_close(adapter.curvature(m, H.total, S.total)["weight"], grad**2)


@pytest.mark.slow
def test_math_md_measurement_snippet_runs():
    """docs/math.md quotes factor ranges of the digits CNN; its snippet gives them."""
    blocks = code_blocks((ROOT / "docs" / "math.md").read_text(), "python")
    assert len(blocks) == 1
    namespace: dict = {"__name__": "curvlab_docs_math_md"}
    exec(compile(blocks[0], "docs/math.md", "exec"), namespace)  # noqa: S102 - our own docs
    ranges = namespace["ranges"]
    assert ranges["1", "H"] < 1e-4 and ranges["4", "H"] < 1e-4  # BatchNorm: only ε/σ² differences
    for layer in ("0", "1", "3", "4"):
        assert ranges[layer, "S"] < 1e-6  # below min-max's ε: S' stays far below 1
    assert ranges["8", "S"] > 1e-5


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


@pytest.mark.parametrize("doc", ["index.md", "architecture.md", "math.md", "plugins.md"])
def test_relative_links_and_anchors_resolve(doc):
    path = ROOT / "docs" / doc
    for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]*))?\)", path.read_text()):
        if "://" in target:
            continue
        resolved = path.parent / target
        assert resolved.exists(), f"{doc}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, (
                f"{doc}: no #{anchor} in {target}"
            )
