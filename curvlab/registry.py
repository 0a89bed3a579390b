"""Plugin registry: a plugin registers itself under (kind, name) and becomes a gin configurable.

A plugin file does::

    @register("estimators", "my_estimator")
    class MyEstimator(FactorEstimator): ...

after which ``estimator="my_estimator"`` (a string) or ``@estimators.my_estimator()`` (a gin
reference) selects it, and ``estimators.my_estimator.some_arg = 3`` binds its arguments.
Unknown names raise a ``KeyError`` that lists the registered ones.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gin

T = TypeVar("T")

#: The plugin kinds and the interface each one implements (filled in by ``curvlab.interfaces``).
KINDS = (
    "adapters",
    "estimators",
    "normalizers",
    "damping",
    "updates",
    "reducers",
    "backends",
    "fallbacks",
)

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
#: gin-configurable twins (subclasses made by gin; the registered classes stay untouched)
_GIN_TWINS: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_BUILTINS_LOADED = False
_GIN_DEPTH = 0


class UnknownPluginError(KeyError):
    """Raised for a plugin name that nothing registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(kind: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register ``cls`` as plugin ``name`` of ``kind`` and make it gin-configurable
    as ``<kind>.<name>``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(KINDS)}")

    def decorator(cls: type[T]) -> type[T]:
        existing = _REGISTRY[kind].get(name)
        if existing is not None:
            if existing.__qualname__ == cls.__qualname__ and existing.__module__ == cls.__module__:
                return existing  # the same file imported twice (e.g. by path and by package)
            raise ValueError(
                f"{kind} plugin {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.plugin_name = name
        cls.plugin_kind = kind
        _REGISTRY[kind][name] = cls
        # external_configurable builds a gin subclass, so Python constructors (and subclasses of
        # this plugin) never pick up gin bindings by accident
        _GIN_TWINS[kind][name] = gin.external_configurable(cls, name=name, module=kind)
        return cls

    return decorator


def load_builtin_plugins() -> None:
    """Import the built-in plugin package once (it registers everything it contains)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("curvlab.plugins")


def load_plugin_file(path: str | os.PathLike) -> None:
    """Import a user's plugin file by path (its ``@register`` decorators run on import).

    Used by ``curvlab run --plugins FILE.py`` and ``build_optimizer(..., plugins=[...])``; a
    plugin inside an installed package can instead be named in the .gin file with ``import``.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {str(path)!r} does not exist")
    name = "curvlab_user_plugin_" + path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def registered(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    load_builtin_plugins()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return sorted(_REGISTRY[kind])


def lookup(kind: str, name: str) -> type:
    """The class registered as ``name`` of ``kind``."""
    names = registered(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        from curvlab.validation import did_you_mean

        raise UnknownPluginError(
            f"unknown {kind} plugin {name!r}{did_you_mean(name, names)}; "
            f"registered {kind}: {', '.join(names)}"
        ) from None


@contextlib.contextmanager
def gin_bindings() -> Iterator[None]:
    """Inside this block, plugins created by name take their arguments from gin bindings
    (``estimators.banded.bandwidth = 4``); outside it (plain Python) they never do."""
    global _GIN_DEPTH
    _GIN_DEPTH += 1
    try:
        yield
    finally:
        _GIN_DEPTH -= 1


def create(kind: str, spec: Any, **kwargs: Any) -> Any:
    """Turn ``spec`` into a plugin instance.

    ``spec`` is a registered name (instantiated with ``kwargs``, on top of its gin bindings when
    called inside :func:`gin_bindings`), an instance (returned as is), or a class (instantiated).
    """
    if isinstance(spec, str):
        cls = lookup(kind, spec)
        if _GIN_DEPTH:
            cls = _GIN_TWINS[kind][spec]
        return cls(**kwargs)
    if isinstance(spec, type):
        return spec(**kwargs)
    return spec
