"""Parameters sharded on dim 0 (FSDP2's ``fully_shard`` DTensors): local rows, local state.

Under FSDP2 every managed parameter is a ``DTensor`` whose rank-local piece is a contiguous
block of rows of dim 0 (``Shard(0)``; ``torch.chunk`` sizes, so a dimension not divisible by
the world size gives ranks unequal blocks, possibly none). The optimizer works on those local
pieces only:

* parameter, gradient and every parameter-shaped state entry are used through their local
  tensors (``DTensor.to_local()``, which under ``no_grad`` is the DTensor's own storage, so
  in-place updates are the updates of the shard);
* per-parameter state is *stored* as DTensors with the parameter's mesh, placements and global
  shape (what ``torch.optim`` optimizers hold under FSDP2), so that
  ``torch.distributed.checkpoint`` can reshard it; :class:`LocalState` is the step's local view;
* the layer factors are small and identical on every rank (reduced by the reducer), and the
  diagonal curvature of a shard is the matching rows of the Kronecker product
  ``F[o, i] = S[o] · H[i]``: :func:`shard_terms` slices the output-side factor instead of
  forming the product of the whole parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or state entry of an FSDP2 model)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (its storage, no copy), ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def original_class(module: nn.Module) -> type:
    """The module's class before ``fully_shard`` (or ``replicate``) swapped in a subclass
    ``FSDP<Class>(FSDPModule, Class)``; exact-class matching looks through that wrapper."""
    cls = type(module)
    while len(cls.__bases__) == 2 and cls.__name__.endswith(cls.__bases__[1].__name__):
        wrapper = cls.__bases__[0].__name__
        if wrapper not in ("FSDPModule", "DDP", "ReplicateModule"):
            break
        cls = cls.__bases__[1]
    return cls


@dataclass(frozen=True)
class RowShard:
    """The rows ``[start, stop)`` of dim 0 that this rank holds of a parameter of ``shape``."""

    local: Tensor
    start: int
    stop: int
    shape: torch.Size

    #: ranks over which the parameter is spread (the mesh size)
    ranks: int = 1
    #: the DTensor parameter (its mesh and placements; None for a plain tensor's rows in tests)
    param: Tensor | None = None
    #: the process group over which the rows are split (None: not split)
    group: Any = None

    @property
    def rows(self) -> int:
        return self.shape[0]


class LocalViews:
    """One local-tensor object per DTensor parameter across steps.

    ``DTensor.to_local()`` returns a new view of the same storage at every call; the optimizer
    caches per-parameter buffers by tensor identity (``Workspace``), so without a stable view
    it would allocate a new buffer at every step. A cached view is replaced when the storage,
    shape or layout of the local tensor changes (FSDP2's lazy initialisation).
    """

    def __init__(self) -> None:
        self._views: dict[int, Tensor] = {}

    def __call__(self, param: Tensor) -> Tensor:
        view = param.to_local()
        cached = self._views.get(id(param))
        if (
            cached is not None
            and cached.data_ptr() == view.data_ptr()
            and cached.shape == view.shape
            and cached.stride() == view.stride()
            and cached.dtype == view.dtype
        ):
            return cached
        self._views[id(param)] = view
        return view


def row_shard(param: Tensor, local_view: Tensor | None = None) -> RowShard:
    """This rank's rows of a DTensor parameter; a clear error for any other layout.

    Supported placements: ``Shard(0)`` (FSDP2) and ``Replicate()`` on any mesh dimension
    (HSDP's replicate dimension), i.e. each rank holds a contiguous block of whole rows.
    """
    for placement in param.placements:
        if not (
            isinstance(placement, Replicate)
            or (isinstance(placement, Shard) and placement.dim == 0)
        ):
            raise NotImplementedError(
                f"curvlab optimizers support parameters sharded on dim 0 (FSDP2's fully_shard) "
                f"or replicated; got a DTensor parameter of shape {tuple(param.shape)} with "
                f"placements {tuple(param.placements)}"
            )
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    start = offset[0] if param.dim() else 0
    rows = shape[0] if param.dim() else 1
    split = [k for k, placement in enumerate(param.placements) if isinstance(placement, Shard)]
    if len(split) > 1:
        raise NotImplementedError(
            f"curvlab optimizers support dim 0 sharded over one mesh dimension; got placements "
            f"{tuple(param.placements)}"
        )
    group = param.device_mesh.get_group(split[0]) if split else None
    view = param.to_local() if local_view is None else local_view
    return RowShard(view, start, start + rows, param.shape, param.device_mesh.size(), param, group)


def gather_rows(local_rows: Tensor, shard: RowShard) -> Tensor:
    """The whole tensor of which every rank holds the rows ``shard`` describes (``local_rows``
    of the shard's shape, e.g. a gradient or momentum; or any tensor whose rows are split as the
    parameter's are): an all-gather, ``P·(W−1)/W`` entries received per rank."""
    param = shard.param
    local_rows = local_rows.contiguous()
    shape = torch.Size((shard.rows, *local_rows.shape[1:]))
    laid_out = DTensor.from_local(
        local_rows,
        param.device_mesh,
        param.placements,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),  # contiguous
    )
    return laid_out.full_tensor()


#: banded/full layers whose parameters are all sharded by the same rows are solved where the
#: rows lie when their operator can (``solve_rows``: the inverse solve); False gathers the
#: parameters' gradients whole and solves them on every rank (docs/distributed.md)
SHARDED_SOLVE = True


def gather_row_blocks(local: Tensor, shard: RowShard) -> Tensor:
    """The whole ``(groups, rows, n)`` tensor of which every rank holds the rows ``shard``
    describes along dim 1 (``local``: ``(groups, shard rows, n)``, e.g. ``V_rows H'⁻¹`` of the
    sharded solve), laid out and gathered like the parameter's rows."""
    groups, _, n = local.shape
    rows = local.transpose(0, 1).reshape(local.shape[1], groups * n)
    return gather_rows(rows, shard).reshape(shard.rows, groups, n).transpose(0, 1)


def as_global(value: Tensor, like: Tensor) -> Tensor:
    """A state entry computed on the shard (the local shape of ``like``) as a DTensor laid out
    like the parameter ``like``; anything else (0-dim counters) unchanged."""
    if not isinstance(value, Tensor) or is_sharded(value) or value.dim() == 0:
        return value
    if value.shape != like.to_local().shape:
        return value
    return DTensor.from_local(
        value, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


class LocalState(MutableMapping):
    """One parameter's optimizer state seen through its local tensors.

    Reads return the local tensor of a DTensor entry (the same storage: in-place updates reach
    the state); a new entry of the shard's shape is stored as a DTensor like the parameter.
    """

    def __init__(self, state: dict[str, Any], param: Tensor) -> None:
        self._state = state
        self._param = param

    def __getitem__(self, key: str) -> Any:
        return local(self._state[key])

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = as_global(value, self._param)

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


# -- the diagonal curvature of a shard ----------------------------------------------------------
def _pad(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.reshape((1,) * (n - t.dim()) + tuple(t.shape))


def _rows(t: Tensor | None, lo: int, hi: int) -> Tensor | None:
    """Rows ``lo:hi`` of dim 0 of a broadcast operand (a size-1 dim broadcasts: unchanged)."""
    return t if t is None or t.shape[0] == 1 else t[lo:hi]


def shard_rows_of_term(
    left: Tensor, right: Tensor | None, shape: tuple[int, ...], rows: int, start: int, stop: int
) -> list[tuple[slice, Tensor, Tensor | None]]:
    """Rows ``[start, stop)`` of the product ``left * right`` (broadcast shape ``shape``, whose
    row-major layout is that of a parameter with ``rows`` rows), as pieces
    ``(rows of the shard it fills, left', right')``.

    * ``shape`` starts (after leading 1s) with ``rows``: one piece, both operands sliced
      (for ``F[o, i] = S[o] · H[i]``: rows of the output-side factor ``S``, ``H`` whole);
    * it starts with ``(A, B)`` with ``A·B = rows`` (grouped convolutions, ``(groups, out/g, d)``):
      one piece per group the rows touch;
    * otherwise (a layout that interleaves rows): the product of the whole parameter, then its
      rows — correct, and as large as the parameter for the duration of the step.
    """
    n = len(shape)
    left, right = _pad(left, n), _pad(right, n)
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1 and rows != 1:
        shape, left = shape[1:], left[0]
        right = None if right is None else right[0]
    if shape[0] == rows:
        return [(slice(0, stop - start), _rows(left, start, stop), _rows(right, start, stop))]
    if len(shape) > 1 and shape[0] * shape[1] == rows:
        per = shape[1]
        pieces = []
        for k in range(shape[0]):
            lo, hi = max(start, k * per), min(stop, (k + 1) * per)
            if lo >= hi:
                continue
            lk = left[k if left.shape[0] != 1 else 0]
            rk = None if right is None else right[k if right.shape[0] != 1 else 0]
            a, b = lo - k * per, hi - k * per
            pieces.append((slice(lo - start, hi - start), _rows(lk, a, b), _rows(rk, a, b)))
        return pieces
    full = left if right is None else left * right
    return [(slice(0, stop - start), full.reshape(rows, -1)[start:stop], None)]


def rows_numel(shape: torch.Size) -> int:
    """Entries per row of dim 0."""
    return math.prod(shape[1:])
