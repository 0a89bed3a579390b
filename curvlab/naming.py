"""Canonical layer names: the same for a model and for its wrapped forms.

``torch.compile`` wraps a module in an ``OptimizedModule`` (children under ``_orig_mod.``),
DistributedDataParallel and DataParallel under ``module.``, FSDP1 under
``_fsdp_wrapped_module.`` and activation checkpointing under ``_checkpoint_wrapped_module.``.
``torch.optim`` state is keyed by parameter position and moves freely between these forms;
curvlab's per-layer state is keyed by layer name, so the names must not depend on the wrappers:
a wrapper's own level is left out of every name (``_orig_mod.0.weight`` → ``0.weight``). FSDP2
(``fully_shard``) renames nothing.

Wrappers are recognised by type, never by name (a user's child may well be called ``module``);
each wrapper type is looked up only if its module is already imported (a model that contains
one has imported it), so this costs no imports.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

#: (module that defines the wrapper, class name, attribute holding the wrapped module)
_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "_fsdp_wrapped_module",
    ),
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "ActivationWrapper",
        "_checkpoint_wrapped_module",
    ),
)


def wrapped_child(module: nn.Module) -> str | None:
    """The attribute under which ``module`` wraps another module, or None (not a wrapper)."""
    for module_name, class_name, attribute in _WRAPPERS:
        defining = sys.modules.get(module_name)
        cls = getattr(defining, class_name, None) if defining is not None else None
        if cls is not None and isinstance(module, cls):
            return attribute
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost module of a chain of wrappers around ``model`` (``model`` itself if none)."""
    while (attribute := wrapped_child(model)) is not None:
        model = getattr(model, attribute)
    return model


def canonical_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with every wrapper level left out of the names (and the
    wrappers themselves not listed); each module once, as ``named_modules`` does."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        wrapped = wrapped_child(module)
        if wrapped is None:
            yield prefix, module
        for name, child in module.named_children():
            if name == wrapped:
                yield from walk(child, prefix)
            else:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def canonical_parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) → its canonical name (the first name, for a parameter used twice)."""
    names: dict[int, str] = {}
    for module_name, module in canonical_named_modules(model):
        for name, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), f"{module_name}.{name}" if module_name else name)
    return names
