"""Sharded checkpoints of a model and its curvlab optimizer with ``torch.distributed.checkpoint``.

``torch.distributed.checkpoint`` (DCP) writes every rank's shards of DTensors in parallel and
reads them back into any other layout: a checkpoint saved by 2 FSDP2 ranks loads into one
process, a plain model's into 4 ranks. ``torch.distributed.checkpoint.state_dict``'s
``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups`` of an optimizer, so the
curvature (factors, eigenbases, step counters) would be lost, and it initialises an empty
optimizer by calling ``step()`` with zero gradients, which would advance curvlab's step count.
This module maps the optimizer's own ``state_dict()`` instead:

* per-parameter state keyed by the parameter's canonical name (:mod:`curvlab.naming`, the same
  names with or without ``torch.compile``/DDP wrappers; FSDP2 renames nothing); entries of
  sharded parameters are DTensors laid out like the parameter, so each rank writes its rows
  and reads the rows it holds now;
* the ``curvature`` entry as it is: factors and eigenpairs are identical on every rank (the
  reducer sums the statistics), so they are plain tensors that DCP stores once;
* parameter groups with parameter names instead of positions.

Usage (every rank calls both; one process works without ``init_process_group``)::

    curvlab.distributed_checkpoint.save("ckpt/step100", model, opt)
    ...
    curvlab.distributed_checkpoint.load("ckpt/step100", model, opt)  # any number of ranks

``load`` builds the receiving state from the checkpoint's metadata and the optimizer's current
parameters, so the optimizer may be fresh (never stepped).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.naming import canonical_parameter_names
from curvlab.sharding import as_global, is_sharded

#: keys of the checkpoint's top level
MODEL, OPTIMIZER = "model", "optimizer"


def _distributed() -> bool:
    """Whether a process group is up (otherwise DCP reads and writes as one process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Canonical name of every optimized parameter, in ``param_groups`` order."""
    names = canonical_parameter_names(model)
    out = []
    for i, p in enumerate(_parameters(optimizer)):
        if id(p) not in names:
            raise ValueError(
                f"distributed_checkpoint: parameter {i} of the optimizer (shape "
                f"{tuple(p.shape)}) is not a parameter of the model; checkpoints name "
                f"parameters by their name in the model"
            )
        out.append(names[id(p)])
    return out


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named instead of numbered (see the module
    doc): ``{"state": {name: {key: tensor}}, "param_groups": [...], "curvature": {...}}``."""
    model = getattr(optimizer, "model", None)
    if model is None:
        raise TypeError(
            "distributed_checkpoint: a curvlab optimizer is needed (it knows its model)"
        )
    names = _names(optimizer, model)
    sd = optimizer.state_dict()
    out: dict[str, Any] = {
        "state": {names[i]: dict(state) for i, state in sd["state"].items()},
        "param_groups": [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[i] for i in g["params"]],
            }
            for g in sd["param_groups"]
        ],
    }
    for key, value in sd.items():  # "curvature" and anything a subclass adds
        if key not in ("state", "param_groups"):
            out[key] = value
    return out


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict`: ``optimizer.load_state_dict`` with the named
    entries matched to this optimizer's parameters by name (in any order)."""
    names = _names(optimizer, optimizer.model)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(state_dict["state"]) - set(index))
    if unknown:
        raise ValueError(
            f"distributed_checkpoint: the checkpoint has state for parameters this optimizer does "
            f"not have: {unknown[:5]} (its parameters: {names[:5]}...)"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"distributed_checkpoint: the checkpoint has {len(saved_groups)} parameter groups, "
            f"the optimizer {len(optimizer.param_groups)}"
        )
    groups, start = [], 0
    for k, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        mine = names[start : start + len(group["params"])]
        if sorted(saved["params"]) != sorted(mine):
            raise ValueError(
                f"distributed_checkpoint: parameter group {k} holds {sorted(saved['params'])} in "
                f"the checkpoint and {sorted(mine)} here"
            )
        # positions in this optimizer's order: torch pairs saved and current ids by position
        groups.append({**saved, "params": list(range(start, start + len(mine)))})
        start += len(mine)
    converted = {key: value for key, value in state_dict.items() if key != "state"}
    converted["param_groups"] = groups
    converted["state"] = {index[name]: state for name, state in state_dict["state"].items()}
    optimizer.load_state_dict(converted)


def _model_state_dict(model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def save(
    checkpoint_id: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Write ``model`` and ``optimizer`` (factors included) as a DCP checkpoint directory.

    Call on every rank of the process group (or in one process without one). Sharded tensors
    are written by the ranks that hold them; replicated ones (the factors) once.
    """
    import torch.distributed.checkpoint as dcp

    state = {MODEL: _model_state_dict(model), OPTIMIZER: optimizer_state_dict(optimizer)}
    with _one_process_ok():
        dcp.save(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())


def _optimizer_template(optimizer: torch.optim.Optimizer, metadata: Any) -> dict[str, Any]:
    """Tensors of the checkpoint's shapes and dtypes to load into: DTensors laid out like the
    parameter for parameter-shaped state of a sharded parameter, plain tensors otherwise;
    ``None`` for the non-tensor entries (DCP replaces them with the saved objects)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = getattr(metadata, "planner_data", None)
    if not isinstance(paths, dict):
        raise ValueError(
            "distributed_checkpoint.load: the checkpoint has no key paths (planner_data); "
            "write it with curvlab.distributed_checkpoint.save"
        )
    params = dict(zip(_names(optimizer, optimizer.model), _parameters(optimizer)))
    device = params[next(iter(params))].device if params else torch.device("cpu")
    template: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        path = paths.get(key)
        if path is None or path[0] != OPTIMIZER:
            continue
        value: Any = None
        if isinstance(item, TensorStorageMetadata):
            shape, dtype = tuple(item.size), item.properties.dtype
            p = params.get(path[2]) if len(path) == 4 and path[1] == "state" else None
            if p is not None and is_sharded(p) and shape == tuple(p.shape) and len(shape):
                local = torch.zeros(p.to_local().shape, dtype=dtype, device=device)
                value = as_global(local, p)
            else:
                value = torch.zeros(shape, dtype=dtype, device=device)
        node = template
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(template)


def _lists(node: Any) -> Any:
    """Containers that DCP flattened from lists (integer path items) back into lists."""
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(isinstance(k, int) for k in out):
        return [out[i] for i in range(len(out))]
    return out


def load(
    checkpoint_id: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Read a checkpoint of :func:`save` into ``model`` and ``optimizer``, resharded to their
    current layout (any number of ranks, FSDP2 or plain). Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    state = {MODEL: _model_state_dict(model), OPTIMIZER: _optimizer_template(optimizer, metadata)}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())
    set_model_state_dict(model, state[MODEL])
    load_optimizer_state_dict(optimizer, state[OPTIMIZER])
