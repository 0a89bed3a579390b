"""Variant names of an ablation grid: each names a folder inside ``--out``, so it must be a
plain, unique folder name (no separators, no leading dot, no report file's name, unique even on
a case-insensitive file system), and the grid file must not name a variant twice (gin builds a
dict, which would silently keep the last entry)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable, Sequence

#: a variant name is a folder name: no separators, no leading dot (".", ".." and hidden folders)
NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
#: files the report writes into --out, which a variant folder must not shadow
REPORT_FILES = ("results.csv", "results.md", "grid.json")


def check_variant_names(names: Iterable[str]) -> None:
    """``ValueError`` naming the first unsafe or case-duplicated variant name."""
    folded: dict[str, str] = {}
    for name in names:
        if not NAME.match(name) or name.lower() in REPORT_FILES or name.endswith(".png"):
            raise ValueError(
                f"variant name {name!r} must match {NAME.pattern} and not be "
                f"{', '.join(REPORT_FILES)} or *.png: it names the run's folder inside --out "
                f"(letters, digits, _ + - and inner dots)"
            )
        if name.lower() in folded:  # one folder on case-insensitive file systems
            raise ValueError(
                f"variant names {folded[name.lower()]!r} and {name!r} differ only in case; "
                f"their runs would share a directory on some file systems: rename one"
            )
        folded[name.lower()] = name


def duplicate_variant_names(text: str, bindings: Sequence[str] = ()) -> list[str]:
    """Keys repeated in the last ``ablate.variants = {...}`` of the grid file and the bindings
    (gin builds a dict, so a repeated key would silently keep only its last entry)."""
    sources = [text, *bindings]
    for source in reversed(sources):  # the last binding is the one gin uses
        literal = _last_variants_literal(source)
        if literal is None:
            continue
        try:
            node = ast.parse(literal, mode="eval").body
        except SyntaxError:
            return []  # gin syntax Python does not read (e.g. @references): nothing to check
        if not isinstance(node, ast.Dict):
            return []
        keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
        return sorted({k for k in keys if keys.count(k) > 1})
    return []


def _last_variants_literal(source: str) -> str | None:
    """The text of the ``{...}`` bound to ``ablate.variants`` last in ``source``."""
    matches = list(re.finditer(r"(?m)^\s*ablate\.variants\s*=\s*(?=\{)", source))
    if not matches:
        return None
    rest = source[matches[-1].end() :]
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(rest).readline):
            if token.type != tokenize.OP:
                continue
            depth += token.string in "([{"
            depth -= token.string in ")]}"
            if depth == 0:
                lines = rest.splitlines(keepends=True)
                row, col = token.end
                return "".join(lines[: row - 1]) + lines[row - 1][:col]
    except tokenize.TokenError:
        return None
    return None
