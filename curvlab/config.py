"""gin glue: the ``optimizer`` configurable and :func:`build_optimizer`.

A .gin file names the parts (see configs/adafisher.gin)::

    optimizer.estimator = "diagonal"        # a registered name ...
    optimizer.damping = @damping.constant() # ... or a gin reference
    damping.constant.value = 1e-3
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from torch import nn

from curvlab import registry
from curvlab.optimizer import CurvatureOptimizer
from curvlab.validation import ConfigError, did_you_mean

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
    try:
        with _quiet_include_probing():
            gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, OSError, ImportError, tokenize.TokenError) as err:
        raise ConfigError(explain_gin_error(err, bindings)) from err
    return path


# -- gin errors in one line -----------------------------------------------------------------------
_UNKNOWN_PARAMETER = re.compile(
    r"Configurable '(?P<selector>[^']+)' doesn't have a parameter named '(?P<name>[^']+)'"
)
_UNKNOWN_CONFIGURABLE = re.compile(
    r"No configurable matching (?:reference )?'@?(?P<selector>[^'(]+)"
)
_LOCATION = re.compile(
    r"\n\s*In (?:file \"(?P<file>[^\"]+)\",|bindings string) line (?P<line>\d+)"
    r"\n\s*(?P<text>[^\n]*)"
)
_REQUIRED = re.compile(r"Required bindings for `(?P<name>[^`]+)` not provided in config: (.*)")
_IN_CALL = re.compile(r"\n\s*In call to configurable '(?P<name>[^']+)'")


def _configurables() -> dict[str, object]:
    """Every registered configurable under the names a .gin file may use for it."""
    out: dict[str, object] = {}
    registry_ = getattr(gin.config, "_REGISTRY", None)  # private: degrade to no suggestions
    for selector, configurable in registry_.items() if registry_ is not None else ():
        out[selector] = configurable
        with contextlib.suppress(KeyError, ValueError):
            out[registry_.minimal_selector(selector)] = configurable
    return out


def _malformed_binding(bindings: Sequence[str]) -> str | None:
    """The first binding that does not parse on its own (a multi-line parse error is reported
    by gin at the line where it gave up, often the next binding)."""
    for binding in bindings:
        try:
            parser = gin.config_parser.ConfigParser(binding, gin.config.ParserDelegate(True))
            for _ in parser:
                pass
        except (SyntaxError, tokenize.TokenError, ValueError):
            return binding
    return None


def _parameters(configurable: object) -> list[str]:
    """The parameter names gin accepts for ``configurable``."""
    fn = getattr(configurable, "wrapped", None)
    if fn is None:
        return []
    try:
        signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    except (TypeError, ValueError):
        return []
    deny = set(getattr(configurable, "denylist", None) or ())
    allow = getattr(configurable, "allowlist", None)
    names = [
        n
        for n, p in signature.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in deny
    ]
    return [n for n in names if allow is None or n in allow]


def _where(text: str, bindings: Sequence[str]) -> str:
    """``--bind 'x = 1'`` or ``FILE line N`` for gin's location suffix of an error message."""
    match = _LOCATION.search(text)
    if match is None:
        return ""
    line = int(match["line"])
    if match["file"]:
        return f"{match['file']} line {line}: "
    first = 1
    for binding in bindings:  # gin joins the bindings with newlines
        last = first + binding.count("\n")
        if first <= line <= last:
            return f"--bind {binding!r}: "
        first = last + 1
    return f"binding {match['text'].strip()!r}: "


def explain_gin_error(err: BaseException, bindings: Sequence[str] = ()) -> str:
    """One line for an error gin raised while parsing a config: where (file and line, or the
    ``--bind``), what, and for an unknown name the valid ones with the closest match."""
    if isinstance(err, (SyntaxError, tokenize.TokenError)):  # a malformed statement
        bad = _malformed_binding(bindings)
        if bad is not None:
            return f"--bind {bad!r} does not parse (expected KEY = VALUE, e.g. optimizer.lr = 0.01)"
        if isinstance(err, tokenize.TokenError):
            return f"a config file does not parse: unbalanced bracket or quote ({err.args[0]})"
        where = f"{err.filename} line {err.lineno}" if err.filename else "the config"
        return f"{where}: cannot parse {(err.text or '').strip()!r}: {err.msg}"
    text = str(err)
    head = text.split("\n", 1)[0]
    where = _where(text, bindings)
    configurables = _configurables()
    unknown = _UNKNOWN_PARAMETER.search(head)
    if unknown:
        selector, name = unknown["selector"], unknown["name"]
        valid = _parameters(configurables.get(selector))
        listing = f"; its parameters: {', '.join(valid)}" if valid else ""
        return (
            f"{where}unknown key {selector}.{name}{did_you_mean(name, valid)}: "
            f"{selector!r} has no parameter {name!r}{listing}"
        )
    unknown = _UNKNOWN_CONFIGURABLE.search(head)
    if unknown:
        selector = unknown["selector"]
        names = sorted({n for n in configurables if not n.startswith("gin.")})
        prefix = selector.rpartition(".")[0]
        same_module = [n for n in names if n.rpartition(".")[0] == prefix] if prefix else []
        if same_module:
            known = f"{prefix}.* configurables: {', '.join(same_module)}"
        else:
            modules = sorted({n.split(".")[0] for n in names if n.count(".") == 1})
            known = f"configurables are named MODULE.NAME with MODULE one of {', '.join(modules)}"
        return f"{where}unknown configurable {selector!r}{did_you_mean(selector, names)}; {known}"
    if isinstance(err, OSError) and not where:
        return f"cannot read a config file: {head}"
    return f"{where}{head}"


def explain_error(err: BaseException, config: str | os.PathLike | None = None) -> str:
    """One line for an error raised while running a configured task: gin's "In call to
    configurable" trail is dropped (its innermost name prefixes the message unless the message
    already names it), and missing ``train`` bindings say what a runnable config needs."""
    text = str(err)
    head = text.split("\n", 1)[0].strip() or type(err).__name__
    required = _REQUIRED.match(head)
    if required:
        name = required["name"]
        missing = [m.strip(" '\"") for m in required.group(2).strip("[]").split(",")]
        keys = ", ".join(f"{name}.{m}" for m in missing if m)
        source = f"{config} does not bind" if config else "the config does not bind"
        if name in ("train", "train_lm", "lm.train_lm"):
            return (
                f"{source} {keys}: it configures only the optimizer. Include a training config "
                f"(e.g. `include \"digits_adafisher.gin\"` or run configs/digits_adafisher.gin) or "
                f"bind {keys} (e.g. --bind 'train.model = @models.digits_cnn' "
                f"--bind 'train.data = @data.digits')"
            )
        return f"{source} {keys}, which {name} requires"
    call = _IN_CALL.search(text)
    # a bad argument is named relative to the configurable that rejected it
    if call and isinstance(err, (ValueError, TypeError)) and not isinstance(err, ConfigError):
        name = call["name"]
        if name not in head:
            head = f"{name}: {head}"
    return head


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
