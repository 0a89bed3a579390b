"""Every ```python block of docs/integrations.md runs as written (in a fresh namespace, in a
temporary working directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_the_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = BLOCKS[index]
    for package in ("lightning", "transformers"):
        if f"import {package}" in code:
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    exec(compile(code, f"{DOC.name}[block {index}]", "exec"), {"__name__": "__doc_example__"})
    torch._dynamo.reset()
