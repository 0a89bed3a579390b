"""gin glue: the ``optimizer`` configurable and :func:`build_optimizer`.

A .gin file names the parts (see configs/adafisher.gin)::

    optimizer.estimator = "diagonal"        # a registered name ...
    optimizer.damping = @damping.constant() # ... or a gin reference
    damping.constant.value = 1e-3
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from torch import nn

from curvlab import registry
from curvlab.optimizer import CurvatureOptimizer

#: ``optimizer`` in .gin files; a subclass made by gin, so CurvatureOptimizer itself is untouched
GinCurvatureOptimizer = gin.external_configurable(
    CurvatureOptimizer, name="optimizer", module="curvlab", denylist=["model", "params"]
)

#: the repository's configs/ (present in a source checkout or an editable install)
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
_SEARCH_PATHS: set[str] = set()


def add_search_path(path: str | os.PathLike) -> None:
    """Let ``include "x.gin"`` find files under ``path``."""
    path = str(Path(path).resolve())
    if path not in _SEARCH_PATHS:
        _SEARCH_PATHS.add(path)
        gin.add_config_file_search_path(path)


def resolve_config(config: str | os.PathLike) -> Path:
    """A config path as given, or relative to the repository (``configs/adafisher.gin``)."""
    candidates = [Path(config), CONFIG_ROOT.parent / config, CONFIG_ROOT / config]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    available = sorted(str(p.relative_to(CONFIG_ROOT.parent)) for p in CONFIG_ROOT.rglob("*.gin"))
    raise FileNotFoundError(
        f"config file {str(config)!r} not found (looked at {[str(c) for c in candidates]}); "
        f"configs in this checkout: {', '.join(available) or 'none'}"
    )


@contextlib.contextmanager
def _quiet_include_probing() -> Iterator[None]:
    """gin's resource reader logs an error for every search path that lacks an included file,
    even when a later path has it; a missing file still raises IOError."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def parse_config(
    config: str | os.PathLike | None,
    bindings: Sequence[str] = (),
    plugins: Sequence[str | os.PathLike] = (),
) -> Path | None:
    """Clear gin, load plugin files, then parse ``config`` and ``bindings`` (left unlocked so
    tests can re-parse)."""
    registry.load_builtin_plugins()
    for plugin in plugins:
        registry.load_plugin_file(plugin)
    gin.clear_config()
    if CONFIG_ROOT.is_dir():
        add_search_path(CONFIG_ROOT)
    path = None
    files = []
    if config is not None:
        path = resolve_config(config)
        add_search_path(path.parent)
        files = [str(path)]
    with _quiet_include_probing():
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    return path


def make_optimizer(model: nn.Module, params=None) -> CurvatureOptimizer:  # noqa: ANN001
    """Build the optimizer that the current gin configuration describes."""
    registry.load_builtin_plugins()
    with registry.gin_bindings():
        return GinCurvatureOptimizer(model, params)


def build_optimizer(
    model: nn.Module,
    config: str | os.PathLike | None = None,
    bindings: Sequence[str] = (),
    params=None,  # noqa: ANN001
    plugins: Sequence[str | os.PathLike] = (),
) -> CurvatureOptimizer:
    """Parse ``config`` (+ ``bindings``) and build its optimizer for ``model``.

    This resets gin's global configuration first. ``config=None`` uses ``bindings`` alone.
    ``plugins`` are plugin files to import first (they register themselves).
    """
    parse_config(config, bindings, plugins)
    return make_optimizer(model, params)
