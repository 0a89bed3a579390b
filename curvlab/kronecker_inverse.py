r"""K-FAC's solve with factored damping: inverses of the damped factors.

Factored Tikhonov damping (Martens & Grosse 2015, Sec. 6.3) keeps the curvature a Kronecker
product, ``F = (S' + √λ/π I) ⊗ (H' + π√λ I)``, so its inverse is one too::

    F^{-1} vec(V) = (S' + √λ/π)^{-1} V (H' + π√λ)^{-1}

A refresh computes the two inverses (Cholesky factorisation and ``cholesky_inverse``: about a
tenth of an eigendecomposition's work) and each step applies them: two products per layer, half
of the eigenbasis solve's four. It is the same operator as the eigenbasis solve with factored
damping (``Q (Λ + δ)^{-1} Qᵀ`` is the inverse of ``H' + δ``), so the result agrees to rounding.

Precision (float64 only where the conditioning needs it): the error of an inverse is about
κ·ε, κ the damped factor's condition number. On CPU an fp32 factor is factorised in fp32 first,
and a batch is redone in float64 when a Cholesky factorisation failed (a pivot ≤ 0: ASDL's fp32
failure) or the estimate κ ≈ λ_max / δ exceeds :data:`KAPPA_FP32` (fp32 error above ~2e-4;
λ_max by power iteration, λ_min ≥ δ as the factor is PSD). Measured on the benchmark's MLP and
ResNet-18 (K-FAC, λ = 1e-3, first steps): κ ≤ 400, fp32 error of the solve ≤ 5e-6 relative
(docs/math.md). On a device, where reading the check would synchronise, fp32 factors are
factorised in float64. The inverses are stored, and applied every step, in the factors' dtype.

λ is read at the refresh: a damping schedule takes effect at the next refresh (as in ASDL and
kfac-pytorch); ``solver="eigen"`` applies it at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.interfaces import update as update_interface
from curvlab.interfaces.normalizer import Normalizer
from curvlab.kronecker import (
    KroneckerOperator,
    KroneckerSolver,
    Packs,
    RefreshItem,
    as_matrix,
    batches,
    normalized_matrix,
    pad_matrices,
    padded_size,
    right_product,
    sandwich,
    split_columns,
    split_pi,
)

INVERSE_KEYS = ("H_inv", "S_inv")
#: a refresh inverts at most this many bytes of factors at once (see InverseSolver.refresh)
REFRESH_CHUNK_BYTES = 64 << 20
#: above this estimated condition number an fp32 factor is inverted in float64
KAPPA_FP32 = 1e4


def largest_eigenvalue(M: Tensor, iterations: int = 30) -> Tensor:
    """λ_max of each symmetric PSD matrix in the (…, d, d) batch, by power iteration from a
    fixed start (deterministic; O(d²) per iteration, nothing next to the O(d³) inverse). It
    approaches λ_max from below, within a few percent after 30 iterations unless the top
    eigenvalues are nearly equal, when any of them is as good for a condition estimate."""
    v = torch.ones(*M.shape[:-1], 1, dtype=M.dtype, device=M.device)
    v[..., ::2, :] = 0.5  # not orthogonal to a top eigenvector of a constant-row matrix
    for _ in range(iterations):
        v = M @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
    return (v * (M @ v)).sum((-2, -1))


def refresh_chunks(batch: list[RefreshItem]) -> list[slice]:
    """Consecutive slices of ``batch`` (layers of equal factor shapes) holding at most
    :data:`REFRESH_CHUNK_BYTES` of factors each (at least one layer)."""
    # a factor is (groups, d, d) dense, or (groups, b + 1, d) banded: d is the last dimension
    per_layer = sum(
        (f.shape[0] if f.dim() > 2 else 1) * f.shape[-1] ** 2 * f.element_size()
        for f in (batch[0].state["H"], batch[0].state["S"])
    )
    size = max(1, REFRESH_CHUNK_BYTES // max(per_layer, 1))
    return [slice(i, min(i + size, len(batch))) for i in range(0, len(batch), size)]


def padded_system(matrices: list[Tensor]) -> Tensor:
    """The (…, n, n) matrices stacked (k, …, D, D), D = :func:`padded_size` (n), each as
    ``blockdiag(M, I)``. Its Cholesky and LU factors and its inverse are ``blockdiag(·, I)`` of
    M's, with exact zeros (a product with a zero is zero), so the inverse is M⁻¹ padded as the
    packs store it, without a copy into the pack; and LAPACK is faster at a multiple of 16:
    measured at 2 threads, Cholesky + ``cholesky_inverse`` of an MLP's 3073² input factor
    took 185 + 384 ms, padded to 3088 149 + 299 ms (3072: 170 + 345)."""
    n = matrices[0].shape[-1]
    D = padded_size(n)
    out = pad_matrices(matrices, D, D)
    out[..., n:, n:].diagonal(dim1=-2, dim2=-1).fill_(1)
    return out


def one_at_a_time(factorize: Callable, M: Tensor):
    """``factorize(M)`` of a (…, d, d) stack; on CPU one matrix per call. torch's batched LU on
    CPU runs LAPACK's getrf on several threads at once when intra-op threads > 1
    (pytorch#142815): measured with torch 2.13 at 2 threads, ``linalg.inv`` of a (3, 300, 300)
    stack raised "Pivots given to lu_solve …" or returned wrong inverses (‖M M⁻¹ − I‖ up to
    10²), float32 and float64 alike. A stack of one is safe, and costs the same per matrix.
    (Cholesky and eigh are not affected: tests/test_kronecker_solvers.py.)"""
    if M.device.type != "cpu" or M.dim() < 3 or M.shape[:-2].numel() <= 1:
        return factorize(M)
    flat = M.reshape(-1, *M.shape[-2:])
    parts = [factorize(flat[k : k + 1]) for k in range(flat.shape[0])]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts).reshape(M.shape)
    return tuple(
        torch.cat(pieces).reshape(*M.shape[:-2], *pieces[0].shape[1:]) for pieces in zip(*parts)
    )


def _inverse_power(inverse: Tensor, power: float) -> Tensor:
    """``(M + δ)^{-p}`` from the stored ``(M + δ)^{-1}`` (symmetric): its eigenvalues to the p."""
    values, vectors = torch.linalg.eigh(inverse.double())
    return ((vectors * values.pow(power).unsqueeze(-2)) @ vectors.transpose(-1, -2)).to(
        inverse.dtype
    )


class InverseOperator(KroneckerOperator):
    """One layer's damped-factor inverses (and what diag(F) needs)."""

    def __init__(
        self,
        state: dict[str, Tensor],
        packs: Packs,
        where: tuple[int, int],
        powers: dict[tuple[int, float], tuple[Tensor, Tensor, Tensor]],
    ) -> None:
        self.state = state
        self.H_inv, self.S_inv = state["H_inv"], state["S_inv"]
        self.dtype = self.H_inv.dtype
        self.packs, (self.pack_id, self.pos) = packs, where
        self._powers = powers

    def _inverses(self, power: float) -> tuple[Tensor, Tensor]:
        # keyed by the inverse tensor itself (held by the entry: its id cannot be reused)
        key = (id(self.H_inv), float(power))
        cached = self._powers.get(key)
        if cached is None or cached[0] is not self.H_inv:
            cached = (
                self.H_inv,
                _inverse_power(self.H_inv, power),
                _inverse_power(self.S_inv, power),
            )
            self._powers[key] = cached
        return cached[1], cached[2]

    accepts_columns = True

    def solve(self, matrix: Tensor | list[Tensor], power: float) -> Tensor:
        if power != 1.0:
            H_inv, S_inv = self._inverses(power)
            return S_inv @ as_matrix(matrix) @ H_inv
        return self.solve_batch([self], [matrix], power)[0]

    def factor_diagonals(self) -> tuple[Tensor, Tensor]:
        return self.state["H_diag"], self.state["S_diag"]

    def solve_rows(
        self,
        columns: list[Tensor],
        start: int,
        stop: int,
        gather: Callable[[Tensor], Tensor],
    ) -> list[Tensor]:
        """Rows ``[start, stop)`` of ``S'⁻¹ V H'⁻¹`` (power 1) from this rank's rows of ``V``,
        given as blocks of columns (the sharded solve, docs/distributed.md): ``Y = V_rows H'⁻¹``
        needs no other rank; ``gather`` returns the whole ``Y`` (an all-gather, as many bytes as
        gathering ``V``); then ``S'⁻¹[rows, :] Y``. Each rank multiplies only its rows. Returns
        the blocks' rows of the solution, the blocks' widths."""
        stacked, _ = self.packs.stacked(self.pack_id)
        H, S = stacked["H_inv"][self.pos], stacked["S_inv"][self.pos]
        out = self.S_inv.shape[-1]
        whole = gather(right_product(columns, H))  # (groups, out, padded in)
        left = S[..., start:stop, :out]
        return [left @ block for block in split_columns(whole, [c.shape[-1] for c in columns])]

    def damped_diagonal(self) -> Tensor:
        S = self.state["S_diag"] + self.state["S_shift"]
        H = self.state["H_diag"] + self.state["H_shift"]
        return S.unsqueeze(-1) * H.unsqueeze(-2)

    def batch_key(self) -> object:
        return (id(self.packs), self.pack_id)

    @classmethod
    def solve_batch(
        cls, operators: list[KroneckerOperator], matrices: list, power: float
    ) -> list[Tensor]:
        ops: list[InverseOperator] = operators  # type: ignore[assignment]
        stacked, size = ops[0].packs.stacked(ops[0].pack_id)
        positions = [op.pos for op in ops]
        if power != 1.0 or (len(ops) > 1 and positions != list(range(size))):
            return [op.solve(m, power) for op, m in zip(ops, matrices)]  # not the whole pack
        H, S = stacked["H_inv"], stacked["S_inv"]
        if len(ops) == 1:  # one layer of a pack: its slice (a view)
            k = positions[0]
            H, S = H[k : k + 1], S[k : k + 1]
        return sandwich(S, matrices, H)


class InverseSolver(KroneckerSolver):
    """Inverses of the damped normalised factors, refreshed every ``inverse_interval`` steps
    (factored damping only).

    The normalised factor comes from the normaliser's matrix form when it has one (identity,
    trace: no eigendecomposition at all), else from its normalised spectrum. Full factors
    (PSD by construction) are inverted through a Cholesky factorisation, banded ones (a band of
    a PSD matrix need not be PSD) through an LU factorisation; neither synchronises with the
    host on a device (:meth:`_invert`).

    Args:
        dtype: the factorisation's dtype; None (default): chosen by conditioning (module
            docstring). The inverses are stored in the factors' dtype.
    """

    name = "inverse"
    state_keys = (*INVERSE_KEYS, "H_diag", "S_diag", "H_shift", "S_shift")
    uses_damping = True

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.packs = Packs(INVERSE_KEYS)
        #: (id of H_inv, power) → (H_inv, inverse powers), for update rules with power ≠ 1
        self._powers: dict[tuple[int, float], tuple[Tensor, Tensor, Tensor]] = {}

    def refresh(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> None:
        """Each batch of equal shapes in chunks of at most :data:`REFRESH_CHUNK_BYTES` of
        factors, each chunk's inverses written into the batch's zero-padded pack as they are
        made: a refresh holds one chunk's copies, Cholesky factors and inverses at a time
        besides the packs (a whole batch held three copies of all of it: ResNet-18's three
        4608² input factors are 255 MB per copy). Small factors still share one batched call
        (what a device needs); on CPU LAPACK runs one matrix at a time either way. The factors
        are inverted at the packs' padded size (:func:`padded_system`), so that a batch in one
        chunk has its inverses become the pack as they are."""
        root = math.sqrt(damping)
        self._powers.clear()
        for batch in batches(items):
            packed: dict[str, Tensor] = {}
            shapes: dict[str, torch.Size] = {}
            for chunk in refresh_chunks(batch):
                part = batch[chunk]
                # the normalised factors, stacked and padded (one copy: the EMA factors stay
                # untouched); n: the factors' size, M[k][..., :n, :n] the factors
                factors = {
                    k: [normalized_matrix(normalizer, it.dense(k)) for it in part] for k in "HS"
                }
                n = {k: factors[k][0].shape[-1] for k in "HS"}
                M = {k: padded_system(factors.pop(k)) for k in "HS"}
                # never-updated (zero) factors precondition as identity factors (π = 1)
                valid = torch.stack([it.state["updated"] for it in part])
                host = update_interface.READ_CPU_FLAGS and valid.device.type == "cpu"
                if not host or not bool(valid.all()):
                    for k in "HS":
                        eye = torch.eye(M[k].shape[-1], dtype=M[k].dtype, device=M[k].device)
                        M[k] = torch.where(valid.reshape(-1, 1, 1, 1), M[k], eye)
                # (layers, groups, n): views of the factors' diagonals
                diag = {k: M[k][..., : n[k], : n[k]].diagonal(dim1=-2, dim2=-1) for k in "HS"}
                pi = torch.stack([split_pi(h, s) for h, s in zip(diag["H"], diag["S"])])
                shifts = {"H": pi * root, "S": root / pi}
                for i, item in enumerate(part):
                    for k in "HS":
                        item.state[k + "_diag"] = diag[k][i].clone()
                        item.state[k + "_shift"] = shifts[k][i]
                for k in "HS":
                    diag[k].add_(shifts[k].reshape(-1, 1, 1))  # M ← M' + δ I, in place
                    del diag[k]
                    inverse = self._inverse(M.pop(k), part[0].structure, shifts[k], n[k])
                    key = k + "_inv"
                    shapes[key] = torch.Size((*inverse.shape[1:-2], n[k], n[k]))
                    if chunk == slice(0, len(batch)):  # the whole batch: the inverse is the pack
                        packed[key] = inverse.contiguous()
                        continue
                    if key not in packed:
                        packed[key] = inverse.new_empty(len(batch), *inverse.shape[1:])
                    packed[key][chunk] = inverse
                    del inverse  # the last reference: freed before the next factor's
            self.packs.install(batch, packed, shapes)

    def _inverse(self, M: Tensor, structure: str, shift: Tensor, size: int | None = None) -> Tensor:
        """``M⁻¹`` (M = factor + shift·I, stacked) in M's dtype, factorised in :attr:`dtype`
        (None: by conditioning, module docstring). ``size``: M is :func:`padded_system`'s
        ``blockdiag(M', I)`` with M' its top-left ``size × size`` block; the inverse comes back
        zero outside M'⁻¹, as :class:`Packs` stores it."""
        size = M.shape[-1] if size is None else size
        inverse = self._factorized_inverse(M, structure, shift, size)
        if size < M.shape[-1]:  # blockdiag(M'⁻¹, I): the margins are zero but the identity's
            inverse[..., :size, size:] = 0  # (set all of them: the packs' products rely on it)
            inverse[..., size:, :] = 0
        return inverse

    def _factorized_inverse(self, M: Tensor, structure: str, shift: Tensor, size: int) -> Tensor:
        """The inverse of M as LAPACK returns it (margins not cleared); ``size``: the
        conditioning check reads M's top-left block only (the identity adds an eigenvalue 1)."""
        if self.dtype is not None or M.dtype == torch.float64:
            return self._invert(M.to(self.dtype or M.dtype), structure).to(M.dtype)
        host = update_interface.READ_CPU_FLAGS and M.device.type == "cpu"
        if not host or structure != "full":
            return self._invert(M.double(), structure).to(M.dtype)
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info > 0).any()) or not self._well_conditioned(M[..., :size, :size], shift):
            return self._invert(M.double(), structure).to(M.dtype)
        return torch.cholesky_inverse(L).mT  # exactly symmetric: the row-major view

    @staticmethod
    def _well_conditioned(M: Tensor, shift: Tensor) -> bool:
        """κ = λ_max / λ_min ≤ :data:`KAPPA_FP32` for every matrix (λ_min ≥ δ = shift): first
        the bound λ_max ≤ tr M (O(d), enough for most factors), else power iteration."""
        shift = shift.reshape(-1, *([1] * (M.dim() - 3)))
        trace = M.diagonal(dim1=-2, dim2=-1).sum(-1)
        if bool((trace <= KAPPA_FP32 * shift).all()):
            return True
        return bool((largest_eigenvalue(M) <= KAPPA_FP32 * shift).all())

    @staticmethod
    def _invert(M: Tensor, structure: str) -> Tensor:
        """``M⁻¹``: a full factor (PSD, + δ > 0) through its Cholesky factor, a band (need not
        be PSD) through LU. ``cholesky_inverse`` and ``inv`` check their result on the host,
        which is free on CPU; elsewhere the inverse comes from triangular solves, which read
        nothing (about 3× the work of ``cholesky_inverse``, once per refresh)."""
        host = update_interface.READ_CPU_FLAGS and M.device.type == "cpu"
        if structure == "full":
            L, _ = torch.linalg.cholesky_ex(M)
            if host:  # column-major and exactly symmetric: its transpose is the row-major view
                return torch.cholesky_inverse(L).mT
            eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            return L_inv.transpose(-1, -2) @ L_inv
        if host:
            return one_at_a_time(torch.linalg.inv, M)
        LU, pivots, _ = one_at_a_time(torch.linalg.lu_factor_ex, M)
        P, L, U = torch.lu_unpack(LU, pivots)  # M = P L U  →  M⁻¹ = U⁻¹ L⁻¹ Pᵀ
        Y = torch.linalg.solve_triangular(L, P.transpose(-1, -2), upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(U, Y, upper=True)

    def operators(
        self, items: list[RefreshItem], normalizer: Normalizer, damping: float, mode: str
    ) -> list[KroneckerOperator]:
        self.packs.ensure(items)
        out: list[KroneckerOperator] = []
        for item in items:
            where = self.packs.find(item)
            assert where is not None  # ensure() packed every item
            out.append(InverseOperator(item.state, self.packs, where, self._powers))
        return out
