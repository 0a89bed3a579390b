"""Who owns the hooks on a layer: at most one live curvlab optimizer per module.

Hooks are installed on the model's layers and live as long as the model does; an optimizer
lives as long as its user keeps it. Three rules tie the two together:

* the hooks reach their optimizer only through a weak reference (:func:`weak_gate`), so a
  dropped optimizer stops capturing at once and can be garbage-collected, and its collection
  removes the hooks (a ``weakref.finalize`` on the optimizer calls its backend's ``detach``);
* ``close()`` removes them explicitly (idempotent; the optimizer is also a context manager);
* a new optimizer on layers that another live optimizer has hooked detaches the old one with
  one :class:`OptimizerReplacedWarning` (Lightning calls ``configure_optimizers`` again on a
  second ``fit`` of the same module: without this, both would capture, and every re-creation
  would add one more set of hooks).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from torch import nn


class OptimizerReplacedWarning(UserWarning):
    """A new curvlab optimizer took over layers that an earlier, still live one had hooked."""


class _Closable(Protocol):
    def close(self) -> None: ...

    def _is_capturing(self) -> bool: ...


#: layer module → weak reference to the optimizer whose hooks are on it
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def weak_gate(optimizer: _Closable) -> Callable[[], bool]:
    """``optimizer._is_capturing()`` through a weak reference: False once it is collected."""
    ref = weakref.ref(optimizer)

    def is_capturing() -> bool:
        owner = ref()
        return owner is not None and owner._is_capturing()

    return is_capturing


def claim(optimizer: _Closable, layers: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Make ``optimizer`` the owner of ``layers`` ((name, module) pairs); close every other live
    optimizer that owned one of them. Returns the names of the layers taken over."""
    layers = list(layers)
    previous: dict[int, tuple[_Closable, list[str]]] = {}
    for name, module in layers:
        ref = _OWNERS.get(module)
        owner = ref() if ref is not None else None
        if owner is not None and owner is not optimizer:
            previous.setdefault(id(owner), (owner, []))[1].append(name)
    taken: list[str] = []
    for owner, names in previous.values():
        owner.close()
        taken += names
    mine = weakref.ref(optimizer)
    for _, module in layers:
        _OWNERS[module] = mine
    return taken


def release(optimizer: _Closable, modules: Iterable[nn.Module]) -> None:
    """Forget ``optimizer`` as the owner of ``modules`` (those another one took stay its)."""
    for module in modules:
        ref = _OWNERS.get(module)
        if ref is not None and ref() in (optimizer, None):
            del _OWNERS[module]


def replaced_message(kind: str, names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4]) + (", …" if len(names) > 4 else "")
    return (
        f"{kind}: detached the earlier curvlab optimizer that was attached to {len(names)} "
        f"layer(s) of this model ({shown}); it no longer captures curvature and its step() "
        f"raises. Call opt.close() (or use `with curvlab.AdaFisher(model) as opt:`) to "
        f"release an optimizer explicitly."
    )
