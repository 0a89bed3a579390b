r"""Solving with the damped Kronecker curvature of banded and full layers.

A layer with banded/full factors is preconditioned jointly (weight and bias as one
``(groups, out, in)`` matrix ``V``) by ``F^{-p} vec(V)`` with ``F`` the damped Kronecker product
of its normalised factors ``S'`` (output side) and ``H'`` (input side). How that is computed is
a :class:`KroneckerSolver`, chosen once from the estimator and the damping mode
(:meth:`curvlab.interfaces.FactorEstimator.kronecker_solver`):

* ``eigen`` (:mod:`curvlab.kronecker_eigen`): eigendecompositions of the factors; exact for
  every damping mode, including ``S' ⊗ H' + λI`` (AdaFisher's λ after the product), which has
  no Kronecker-factored inverse. Four products per layer and step.
* ``inverse`` (:mod:`curvlab.kronecker_inverse`): factored damping (Martens & Grosse 2015)
  *is* a Kronecker product, ``(S' + √λ/π)⊗(H' + π√λ)``, so its inverse is the Kronecker
  product of two matrix inverses: two products per layer and step, and a Cholesky
  factorisation instead of an eigendecomposition at a refresh.
* ``block`` (:mod:`curvlab.kronecker_block`): the eigenbasis solve on the diagonal blocks of
  banded factors (approximate: the band's entries that couple two blocks are dropped).

A solver's *refresh* (every ``inverse_interval`` steps, and for a layer whose factors arrived
since) turns the EMA factors into what the steps apply, stored in the layer's curvature state
(saved with the optimizer: a resumed run continues bitwise). Layers whose factors have equal
shapes have their products applied as one batch, and are refreshed in batches (the inverse
solve: in chunks of at most 64 MiB of factors, for memory).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.interfaces import update as update_interface
from curvlab.interfaces.adapter import join_columns
from curvlab.interfaces.normalizer import Normalizer
from curvlab.structures import dense_factor

#: solver names (``estimators.full.solver`` / ``estimators.banded.solver``)
SOLVERS = ("auto", "eigen", "inverse", "block")


def split_pi(H: Tensor, S: Tensor) -> Tensor:
    """π = sqrt((tr H / dim H) / (tr S / dim S)) of the factored damping (Martens & Grosse),
    from the entries or eigenvalues ``H``, ``S`` (all groups)."""
    tiny = torch.finfo(H.dtype).tiny
    return torch.sqrt(H.mean().clamp_min(tiny) / S.mean().clamp_min(tiny))


def eigen_denominator(
    LS: Tensor, LH: Tensor, damping: float, mode: str, power: float
) -> Tensor:
    """``D`` of the eigenbasis solve for spectra ``LS`` (groups, out) and ``LH`` (groups, in):
    ``F^{-p}`` divides the rotated matrix by ``D`` (docs/math.md, damping table)."""
    LS, LH = LS.unsqueeze(-1), LH.unsqueeze(-2)
    if mode == "factored":
        pi = split_pi(LH, LS)
        root = math.sqrt(damping)
        denom = (LS + root / pi) * (LH + pi * root)
        return denom if power == 1.0 else denom.pow(power)
    if mode == "after_root":
        denom = LS * LH
        return (denom if power == 1.0 else denom.clamp_min(0).pow(power)) + damping
    denom = LS * LH + damping
    return denom if power == 1.0 else denom.pow(power)


def damped_diagonal(S_diag: Tensor, H_diag: Tensor, damping: float, mode: str) -> Tensor:
    """diag(F) (groups, out, in) from the normalised factors' diagonals (factored damping: π
    from their means, which are the spectra's)."""
    if mode == "factored":
        pi = split_pi(H_diag, S_diag)
        root = math.sqrt(damping)
        return (S_diag + root / pi).unsqueeze(-1) * (H_diag + pi * root).unsqueeze(-2)
    return S_diag.unsqueeze(-1) * H_diag.unsqueeze(-2) + damping


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a stack of symmetric factors, redone in float64 where the
    factors' dtype failed.

    LAPACK's fp32 divide-and-conquer (``ssyevd``, the CPU wheel's) can return NaN eigenpairs for
    a finite symmetric matrix without reporting an error, or stop with "failed to converge".
    Measured here: a 64 × 64 diagonal block of banded AdaFisher's H on the MNIST-1D CNN (entries
    within [−2, 35]) gave two NaN eigenvalues in fp32, while float64 gave all 64; the NaN
    eigenvectors then made the Linear layer's update NaN mid-training. On CPU, where reading a
    flag is free, the batch elements with a non-finite result are recomputed in float64 and
    cast back (the others keep their fp32 result, bitwise); an error of the fp32 call redoes
    the whole batch. On a device the result is not read (that would synchronise). A factor that
    fails in float64 too is not finite or not symmetric: that is raised, naming it."""
    try:
        values, vectors = torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        if M.dtype == torch.float64:
            raise
        return _eigh_float64(M)
    if M.dtype == torch.float64 or not (update_interface.READ_CPU_FLAGS and M.device.type == "cpu"):
        return values, vectors
    bad = ~values.isfinite().reshape(-1, values.shape[-1]).all(-1)
    if bool(bad.any()):
        flat_values = values.reshape(-1, values.shape[-1])
        flat_vectors = vectors.reshape(-1, *vectors.shape[-2:])
        redo_values, redo_vectors = _eigh_float64(M.reshape(-1, *M.shape[-2:])[bad])
        flat_values[bad], flat_vectors[bad] = redo_values, redo_vectors
    return values, vectors


def _eigh_float64(M: Tensor) -> tuple[Tensor, Tensor]:
    why = "non-finite eigenpairs"
    try:
        values, vectors = torch.linalg.eigh(M.double())
    except torch.linalg.LinAlgError as err:
        values, why = None, str(err)
    if values is None or not bool(values.isfinite().all() and vectors.isfinite().all()):
        raise torch.linalg.LinAlgError(
            f"the eigendecomposition of a curvature factor failed in {M.dtype} and in float64 "
            f"({why}); its entries are not finite or not symmetric, as in a run that diverged"
        )
    return values.to(M.dtype), vectors.to(M.dtype)


def normalized_matrix(normalizer: Normalizer, dense: Tensor) -> Tensor:
    """The normalised factor as a matrix: the normaliser's matrix form when it has one (no
    eigenvalues needed), else ``Q diag(normalizer(Λ)) Qᵀ`` (exact for an affine map)."""
    matrix = normalizer.normalize_matrix(dense)
    if matrix is not None:
        return matrix
    values, vectors = symmetric_eigh(dense)
    values = normalizer(values, "spectrum")
    return (vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2)


#: per-slice multiply-adds from which a CPU batched product runs slice by slice (see matmul)
CPU_SLICE_MACS = 1 << 28


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for stacks of equal batch shape. On CPU, large slices are multiplied one
    ``mm`` at a time into one output: a batched GEMM of (3, 512, 4608) × (3, 4608, 4608) took
    1.1–1.3× the time of three ``mm`` calls on the benchmark CPU (2 threads: 909 against
    719 ms), while small slices (≲ 128 × 1152 × 1152) are faster batched."""
    if (
        a.device.type != "cpu"
        or a.dim() < 3
        or a.shape[:-2] != b.shape[:-2]
        or a.shape[-2] * a.shape[-1] * b.shape[-1] < CPU_SLICE_MACS
    ):
        return a @ b
    batch = a.shape[:-2]
    dtype = torch.promote_types(a.dtype, b.dtype)
    out = torch.empty(*batch, a.shape[-2], b.shape[-1], dtype=dtype)
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    o3 = out.view(-1, *out.shape[-2:])
    for k in range(a3.shape[0]):
        torch.mm(a3[k], b3[k], out=o3[k])
    return out


def as_matrix(matrix: Tensor | list[Tensor]) -> Tensor:
    """A matrix given as blocks of columns (``LayerAdapter.matrix_columns``), joined."""
    return matrix if isinstance(matrix, Tensor) else join_columns(matrix)


def sandwich(
    left: Tensor, matrices: list[Tensor | list[Tensor]], right: Tensor
) -> list[Tensor | list[Tensor]]:
    """``left[k] @ V_k @ right[k]`` for each k (``left``: (k, …, r, r) stacked and zero-padded,
    ``right``: (k, …, c, c); ``V_k`` may be smaller than (r, c): the product is that of the
    factors' top-left blocks, at V_k's shape). ``V_k`` is a matrix, or a list of blocks of its
    columns (``LayerAdapter.matrix_columns``), and its product comes back the same way: a
    matrix, or the product's blocks of the same widths.

    Large products on CPU (:data:`CPU_SLICE_MACS`, where :func:`matmul` goes slice by slice
    anyway) read each matrix's blocks where they lie: ``Y = Σ_j B_j right[rows of B_j, :]``
    (a bias column is a rank-1 update), then ``left[:m, :m] Y`` per block of columns, so a
    weight's product is a contiguous tensor of its own width. Nothing is stacked or padded: no
    gradient is copied (stacking copied ResNet-18's 11 M entries per step; joining and padding
    a Linear's weight and bias copied it twice, and the strided result was copied again to be
    flattened). ``Y`` keeps the padded width ``c`` (BLAS is slow on an odd output width such as
    a Linear's ``in + 1``). Small products are stacked, padded and batched."""
    rows, cols = left.shape[-1], right.shape[-1]
    blocks = [[m] if isinstance(m, Tensor) else m for m in matrices]
    widths = [block.shape[-1] for block in blocks[0]]
    m, n = blocks[0][0].shape[-2], sum(widths)
    per_slice = left.device.type == "cpu" and rows * cols * max(rows, cols) >= CPU_SLICE_MACS
    if not per_slice:
        stacked = pad_matrices([as_matrix(b) for b in blocks], rows, cols)
        joined = matmul(matmul(left, stacked), right)[..., :m, :n].unbind()
        return [
            solved if isinstance(matrix, Tensor) else split_columns(solved, widths)
            for solved, matrix in zip(joined, matrices)
        ]
    out: list[Tensor | list[Tensor]] = []
    for k, pieces in enumerate(blocks):
        left_k = left[k] if m == rows else left[k][..., :m, :m]
        y = right_product(pieces, right[k])
        if isinstance(matrices[k], Tensor):
            solved = left_k @ y
            out.append(solved if cols == n else solved[..., :n])
        else:
            out.append([left_k @ columns for columns in split_columns(y, widths)])
    return out


def right_product(columns: list[Tensor], right: Tensor) -> Tensor:
    """``[B_1 | B_2 | …] @ right`` from the column blocks where they lie: ``Σ_j B_j right[rows of
    B_j, :]`` (a one-column block is a rank-1 update); ``right`` may have more rows (padding)."""
    y, start = None, 0
    for piece in columns:
        band = right[..., start : start + piece.shape[-1], :]
        if y is None:
            y = piece @ band
        elif y.dim() == 3:
            y.baddbmm_(piece, band)
        else:
            y.add_(piece @ band)
        start += piece.shape[-1]
    return y


def split_columns(matrix: Tensor, widths: list[int]) -> list[Tensor]:
    """Column blocks of the given widths (views)."""
    return list(matrix[..., : sum(widths)].split(widths, dim=-1))


@dataclass
class RefreshItem:
    """One layer to refresh: its name, factor structure and curvature state (written to)."""

    name: str
    structure: str
    state: dict[str, Tensor]

    def dense(self, key: str) -> Tensor:
        return dense_factor(self.structure, self.state[key])


def refresh_cost(item: RefreshItem) -> float:
    """Relative cost of refreshing a layer: ``Σ groups · d³`` over its two factors (an
    eigendecomposition or inverse of each group's d×d factor)."""
    cost = 0.0
    for key in ("H", "S"):
        factor = item.state[key]
        groups = factor.shape[0] if factor.dim() > 2 else 1
        cost += groups * float(factor.shape[-1]) ** 3
    return cost


def batches(items: Sequence[RefreshItem]) -> list[list[RefreshItem]]:
    """Items grouped by the dtype, device and shapes of their factors (one batch each)."""
    out: dict[tuple, list[RefreshItem]] = {}
    for item in items:
        H, S = item.state["H"], item.state["S"]
        key = (H.dtype, H.device, item.structure, tuple(H.shape), tuple(S.shape))
        out.setdefault(key, []).append(item)
    return list(out.values())


class KroneckerOperator(ABC):
    """``F^{-p}`` of one layer at one step (damping bound in)."""

    #: dtype the solve computes in (the factors')
    dtype: torch.dtype
    #: whether :meth:`solve` / :meth:`solve_batch` take a matrix as a list of blocks of its
    #: columns (``LayerAdapter.matrix_columns``); otherwise they get the joined matrix
    accepts_columns: bool = False

    @abstractmethod
    def solve(self, matrix: Tensor, power: float) -> Tensor:
        """``F^{-p} vec(V)`` for the (groups, out, in) matrix view ``V`` (a new tensor)."""

    @abstractmethod
    def factor_diagonals(self) -> tuple[Tensor, Tensor]:
        """diag(H'), diag(S') of the normalised, undamped factors, as (groups, d)."""

    @abstractmethod
    def damped_diagonal(self) -> Tensor:
        """diag(F), damping included, as (groups, out, in) (docs/math.md)."""

    def batch_key(self) -> Hashable | None:
        """Operators with the same key are solved as one batch by :func:`solve_all` (through
        :meth:`solve_batch` of the first); None: alone."""
        return None

    @classmethod
    def solve_batch(
        cls, operators: list[KroneckerOperator], matrices: list[Tensor], power: float
    ) -> list[Tensor]:
        return [op.solve(m, power) for op, m in zip(operators, matrices)]


def solve_all(
    operators: list[KroneckerOperator], matrices: list[Tensor], power: float
) -> list[Tensor]:
    """``F^{-p}`` of every layer: operators with a common batch key in one batched solve."""
    out: list[Tensor | None] = [None] * len(operators)
    groups: dict[Hashable, list[int]] = {}
    for i, op in enumerate(operators):
        key = op.batch_key()
        if key is None:
            out[i] = op.solve(matrices[i], power)
        else:
            groups.setdefault(key, []).append(i)
    for indices in groups.values():
        if len(indices) == 1:
            i = indices[0]
            out[i] = operators[i].solve(matrices[i], power)
            continue
        ops = [operators[i] for i in indices]
        solved = type(ops[0]).solve_batch(ops, [matrices[i] for i in indices], power)
        for i, s in zip(indices, solved):
            out[i] = s
    return out  # type: ignore[return-value]


class KroneckerSolver(ABC):
    """What a refresh computes from banded/full EMA factors, and the operator of a step.

    Implementations keep what they compute in each layer's curvature state under
    :attr:`state_keys` (the first marks a refreshed layer), so that ``state_dict()`` carries
    it and a resumed run continues bitwise.
    """

    #: the name estimators select it by
    name: str = ""
    #: curvature-state entries a refresh writes
    state_keys: tuple[str, ...] = ()
    #: whether a refresh bakes λ in (then a refresh with a new λ is never skipped)
    uses_damping: bool = False

    def is_stale(self, state: dict[str, Tensor]) -> bool:
        """Whether the layer must be refreshed now, whatever the schedule (default: it never
        was)."""
        return self.state_keys[0] not in state

    @abstractmethod
    def refresh(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> None:
        """Recompute the state entries of every item from its EMA factors ``H``, ``S``
        (never-updated factors, ``updated`` False, precondition as identity factors)."""

    @abstractmethod
    def operators(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> list[KroneckerOperator]:
        """Each refreshed layer's operator for this step, from its state."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def default_solver(damping_mode: str) -> KroneckerSolver:
    """Inverses of the damped factors for factored damping (two products per layer and step),
    the exact eigenbasis solve otherwise."""
    from curvlab.kronecker_eigen import EigenSolver
    from curvlab.kronecker_inverse import InverseSolver

    return InverseSolver() if damping_mode == "factored" else EigenSolver()


def make_solver(name: str, damping_mode: str, **options: object) -> KroneckerSolver:
    """The solver called ``name`` (one of :data:`SOLVERS`; ``auto``: :func:`default_solver`)."""
    from curvlab.kronecker_block import BlockEigenSolver
    from curvlab.kronecker_eigen import EigenSolver
    from curvlab.kronecker_inverse import InverseSolver

    if name == "auto":
        return default_solver(damping_mode)
    if name == "eigen":
        return EigenSolver()
    if name == "inverse":
        if damping_mode != "factored":
            raise ValueError(
                f"solver='inverse' needs factored damping (its inverse is a Kronecker product); "
                f"the damping mode is {damping_mode!r}: use solver='eigen' or 'auto'"
            )
        return InverseSolver()
    if name == "block":
        return BlockEigenSolver(**options)  # type: ignore[arg-type]
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {name!r}")


#: square matrices in packs get dimensions rounded up to this (zeros beyond): BLAS products
#: of an odd size are slow (V(1024×3073)·A(3073×3073): 500 ms, ×3072 330 ms, ×3088 300 ms on
#: the benchmark CPU; a Linear layer's bias column makes the odd size)
PAD_TO = 16


def padded_size(d: int) -> int:
    return -(-d // PAD_TO) * PAD_TO


def pad_matrices(matrices: list[Tensor], rows: int, cols: int, value: float = 0.0) -> Tensor:
    """The (…, m, n) matrices stacked into a (k, …, rows, cols) tensor filled with ``value``
    beyond them (one copy)."""
    first = matrices[0]
    m, n = first.shape[-2:]
    if (m, n) == (rows, cols):
        return torch.stack(matrices)
    out = first.new_empty((len(matrices), *first.shape[:-2], rows, cols))
    for i, matrix in enumerate(matrices):
        out[i, ..., :m, :n] = matrix
    out[..., :m, n:] = value  # only the margins are filled (a pass less over the matrix)
    out[..., m:, :] = value
    return out


class Packs:
    """Refreshed tensors of layers with equal shapes, stacked into one tensor per (batch, key);
    the layers' state entries are views of it, so that a step solves them as one batch.
    Square matrices (the last two dimensions equal) are stored zero-padded to a multiple of
    :data:`PAD_TO` (their state entries view the top-left block), for the products' speed.

    State entries replaced from outside (``load_state_dict``) no longer view their pack; such
    layers are re-stacked (copied once) by :meth:`ensure`. Values never change by stacking.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self._where: dict[str, tuple[int, int]] = {}  # layer → (pack id, position)
        self._packs: dict[int, tuple[dict[str, Tensor], int]] = {}  # id → (stacked, size)
        self._next_id = 0

    @staticmethod
    def _view(stacked: Tensor, pos: int, shape: torch.Size) -> Tensor:
        return stacked[pos][..., : shape[-2], : shape[-1]] if len(shape) >= 2 else stacked[pos]

    def adopt(self, items: list[RefreshItem], stacked: dict[str, Tensor]) -> None:
        """``stacked[key][i]`` becomes item i's ``state[key]`` (a view of the pack)."""
        packed = {}
        for key, value in stacked.items():
            shape = value.shape[1:]
            if len(shape) >= 2 and shape[-1] == shape[-2]:
                # a zero-padded tensor, row-major (LAPACK's results are column-major), as
                # re-stacking after a load makes it: MKL's rounding depends on the operands'
                # layout and alignment, and a resumed run must continue bitwise. A contiguous
                # stack that needs no padding already is one (no second copy of what ensure()
                # has just stacked)
                d = padded_size(shape[-1])
                if d == shape[-1] and value.is_contiguous():
                    packed[key] = value
                else:
                    packed[key] = pad_matrices(list(value.unbind()), d, d)
            else:
                packed[key] = value.contiguous()
        self.install(items, packed, {key: value.shape[1:] for key, value in stacked.items()})

    def install(
        self, items: list[RefreshItem], packed: dict[str, Tensor], shapes: dict[str, torch.Size]
    ) -> None:
        """``packed[key]`` becomes the pack (stacked, contiguous; square matrices zero-padded to
        :func:`padded_size`, as :meth:`adopt` makes them) and item i's ``state[key]`` views the
        top-left block of ``shapes[key]`` of ``packed[key][i]``."""
        pack_id, self._next_id = self._next_id, self._next_id + 1
        for pos, item in enumerate(items):
            for key in self.keys:
                item.state[key] = self._view(packed[key], pos, shapes[key])
            self._where[item.name] = (pack_id, pos)
        self._packs[pack_id] = (packed, len(items))
        live = {p for p, _ in self._where.values()}
        for old in [p for p in self._packs if p not in live]:
            del self._packs[old]

    def find(self, item: RefreshItem) -> tuple[int, int] | None:
        """(pack id, position) while the item's entries still view its pack."""
        where = self._where.get(item.name)
        if where is None or where[0] not in self._packs:
            return None
        packed, _ = self._packs[where[0]]
        for key in self.keys:
            entry = item.state.get(key)
            if entry is None:
                return None
            view = self._view(packed[key], where[1], entry.shape)
            if (
                entry.data_ptr() != view.data_ptr()
                or entry.shape != view.shape
                or entry.stride() != view.stride()
            ):
                return None
        return where

    def ensure(self, items: list[RefreshItem]) -> None:
        """Make every batch of equal-shape items (:func:`batches`, in order) exactly one pack,
        re-stacking (copying once) a batch that is not: after ``load_state_dict`` (entries no
        longer view a pack), or after a refresh of some of its layers (a layer whose factors
        arrived late). So the packs, and the rounding of the batched products, depend only on
        the layers, not on the history (a resumed run continues bitwise)."""
        for batch in batches(items):
            where = [self.find(item) for item in batch]
            first = where[0]
            if (
                first is not None
                and self._packs[first[0]][1] == len(batch)
                and where == [(first[0], pos) for pos in range(len(batch))]
            ):
                continue
            stacked = {k: torch.stack([it.state[k] for it in batch]) for k in self.keys}
            self.adopt(batch, stacked)

    def stacked(self, pack_id: int) -> tuple[dict[str, Tensor], int]:
        """The pack's (padded) tensors and its number of layers."""
        return self._packs[pack_id]
