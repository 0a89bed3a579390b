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
