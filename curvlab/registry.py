"""Plugin registry: a plugin registers itself under (kind, name) and becomes a gin configurable.

A plugin file does::

    @register("estimators", "my_estimator")
    class MyEstimator(FactorEstimator): ...

after which ``estimator="my_estimator"`` (a string) or ``@estimators.my_estimator()`` (a gin
reference) selects it, and ``estimators.my_estimator.some_arg = 3`` binds its arguments.
Unknown names raise a ``KeyError`` that lists the registered ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import gin

T = TypeVar("T")

#: The plugin kinds and the interface each one implements (filled in by ``curvlab.interfaces``).
KINDS = ("adapters", "estimators", "normalizers", "damping", "updates", "reducers", "backends")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_BUILTINS_LOADED = False


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
        configurable = gin.configurable(name, module=kind)(cls)
        configurable.plugin_name = name
        configurable.plugin_kind = kind
        _REGISTRY[kind][name] = configurable
        return configurable

    return decorator


def load_builtin_plugins() -> None:
    """Import the built-in plugin package once (it registers everything it contains)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("curvlab.plugins")


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
        raise UnknownPluginError(
            f"unknown {kind} plugin {name!r}; registered {kind}: {', '.join(names)}"
        ) from None


def create(kind: str, spec: Any, **kwargs: Any) -> Any:
    """Turn ``spec`` into a plugin instance.

    ``spec`` is a registered name (instantiated with ``kwargs`` on top of its gin bindings), an
    instance (returned as is), or a class (instantiated).
    """
    if isinstance(spec, str):
        return lookup(kind, spec)(**kwargs)
    if isinstance(spec, type):
        return spec(**kwargs)
    return spec
