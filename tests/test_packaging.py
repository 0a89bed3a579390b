"""Every package folder under curvlab/, plugins/ and experiments/ is listed in pyproject.toml, so
a built wheel contains it (editable installs would hide a missing entry)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {"curvlab": "curvlab", **config["package-dir"]}
    found = set()
    for import_root, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([import_root, *rel.parts]) if rel.parts else import_root)
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def _readme_commands() -> list[str]:
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, test_command = _readme_commands()
    assert "curvlab run" in main_job
    assert test_command in (ROOT / ".ci" / "run").read_text()
    for command in (main_job, test_command):  # both install the pinned environment
        assert command.startswith("pip install -c constraints.txt ")


def test_library_declares_a_torch_range_and_the_lock_pins_the_tested_one():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert "2.13.0" in torch_req.specifier and "2.12.0" in torch_req.specifier
    assert not any(s.operator == "==" for s in torch_req.specifier)
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in lock
    assert not any(line.lower().startswith("torchvision") for line in lock)


def test_the_test_environment_imports_the_training_stacks():
    """Where the README's test command built the environment (CI): torchvision is absent, so
    `import lightning` and HF's `Trainer` work (SPEC §5: PyPI's torchvision breaks both)."""
    import importlib.util
    import os

    if not os.environ.get("CI"):
        import pytest

        pytest.skip("checks the environment the README's test command builds (CI=true)")
    assert importlib.util.find_spec("torchvision") is None
    import lightning  # noqa: F401
    from transformers import Trainer  # noqa: F401
