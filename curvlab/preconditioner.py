"""The preconditioner of one step, built from every layer's normalised factors.

Diagonal layers never form a Kronecker matrix: ``F = S'[:, None] * H'[None, :] + λ`` (SPEC §3),
written per parameter into a buffer reused across steps (:class:`Workspace`).
Banded and full layers are solved jointly (weight and bias) by the operators of the optimizer's
:class:`~curvlab.kronecker.KroneckerSolver` (eigenbasis, inverses of the damped factors, or
diagonal blocks; :mod:`curvlab.kronecker`), layers of equal shapes as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from curvlab import sharding
from curvlab.interfaces.update import Preconditioner
from curvlab.kronecker import KroneckerOperator, as_matrix, solve_all, split_pi
from curvlab.layers import LayerRecord
from curvlab.regions import rows_of, span, tiles, uncovered_parameters
from curvlab.sharding import (
    RowShard,
    gather_row_blocks,
    gather_rows,
    is_sharded,
    local,
    shard_rows_of_term,
)

__all__ = ["CurvaturePreconditioner", "LayerFactors", "Workspace", "split_pi"]


@dataclass
class LayerFactors:
    """Normalised diagonal factors of one layer (banded/full layers come as a
    :class:`~curvlab.kronecker.KroneckerOperator` instead)."""

    structure: str  # "diagonal"
    H: Tensor
    S: Tensor


class Workspace:
    """Parameter-shaped buffers for the diagonal curvature, reused across steps.

    Allocating a parameter-sized tensor per parameter and step is what made the step slow on
    CPU (fresh pages are faulted in and zeroed: 6 ms vs 0.8 ms for the same products on the
    GPT benchmark); on CUDA it churns the caching allocator. One buffer per parameter costs
    as much memory as the transient tensors did.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}

    def buffer(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(id(param))
        if buf is None or buf.dtype != dtype or buf.shape != param.shape:
            buf = torch.empty(param.shape, dtype=dtype, device=param.device)
            self._buffers[id(param)] = buf
        return buf


class _Divisor(NamedTuple):
    """A per-parameter divisor d of the update, its finite part (inf → 0) and λ·d."""

    value: Tensor
    finite: Tensor
    damped: Tensor


class Term(NamedTuple):
    """One term of a diagonal curvature: ``left * right`` (right None: left alone), viewed
    as ``shape`` (their broadcast shape, computed once: ``torch.broadcast_shapes`` costs more
    than the product for small layers); ``region``: the rows of the parameter it covers (a
    block of a packed parameter, ``LayerAdapter.regions``), None for the whole parameter."""

    left: Tensor
    right: Tensor | None
    shape: tuple[int, ...]
    region: slice | None = None

    @classmethod
    def of(cls, left: Tensor, right: Tensor | None, region: slice | None = None) -> Term:
        if right is None:
            return cls(left, None, tuple(left.shape), region)
        a, b = tuple(left.shape), tuple(right.shape)
        n = max(len(a), len(b))
        a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
        shape = tuple(x if y == 1 else y for x, y in zip(a, b))
        if any(x not in (1, y) for x, y in zip(a, shape)) or any(
            y not in (1, x) for x, y in zip(shape, b)
        ):
            raise ValueError(f"curvature terms of shapes {a} and {b} do not broadcast")
        return cls(left, right, shape, region)


def uses_curvature_terms(adapter: object) -> bool:
    """Whether the adapter's most derived definition is ``curvature_terms`` (not ``curvature``)."""
    for cls in type(adapter).__mro__:
        if "curvature_terms" in cls.__dict__:
            return True
        if "curvature" in cls.__dict__:
            return False
    return False


@dataclass(frozen=True)
class CachedTerms:
    """Diagonal products that view the packed factors (valid while their storage is), and the
    layers whose products are new tensors (a ``curvature()`` override, factored damping),
    rebuilt every step."""

    stable: dict[int, list[Term]]
    volatile_layers: frozenset[str]


class CurvaturePreconditioner(Preconditioner):
    """``F`` of every optimized parameter for the current step.

    Sources, in order: an elementwise curvature (``elementwise`` estimators), the layers'
    factors (diagonal: summed over every layer that uses the parameter; banded/full: one joint
    solve of weight and bias per layer), the fallback policy's curvature of a parameter without
    layer curvature (``fallback_curvature``, undamped: damped here like the layers'), the
    constant ``fallback_value`` for the rest. A parameter
    shared by several layers uses the diagonals of their factors (summed), whatever the
    structure.
    """

    def __init__(
        self,
        layers: list[LayerRecord],
        layer_factors: dict[str, LayerFactors | KroneckerOperator],
        elementwise: dict[int, Tensor],
        damping: float,
        mode: str,
        fallback_value: float,
        shared: set[int],
        workspace: Workspace | None = None,
        cached: CachedTerms | None = None,
        stable_storages: frozenset[int] = frozenset(),
        fallback_curvature: dict[int, Tensor] | None = None,
        shards: dict[int, RowShard] | None = None,
    ) -> None:
        self.damping = damping
        self.fallback_curvature = fallback_curvature or {}
        self.mode = mode
        self.fallback_value = fallback_value
        self.elementwise = elementwise
        self.workspace = workspace if workspace is not None else Workspace()
        self.joint: list[tuple[LayerRecord, KroneckerOperator]] = []
        stable: dict[int, list[Term]] = {}
        volatile: dict[int, list[Term]] = {}
        volatile_layers: set[str] = set()
        derived: list[tuple[LayerRecord, Tensor, Tensor]] = []
        #: packed parameters with rows that no layer with factors covers yet (a block not
        #: captured so far): identity curvature for the whole parameter until it is covered
        self.incomplete = uncovered_parameters(layers, layer_factors)
        for record in layers:
            factors = layer_factors.get(record.name)
            if factors is None:
                continue
            if isinstance(factors, LayerFactors):
                if cached is not None and record.name not in cached.volatile_layers:
                    continue  # its products are in cached.stable
                layer_terms = self._layer_terms(record, factors.H, factors.S)
                # products that only view the factors' storage stay valid while it does
                views = all(
                    t is None or t.untyped_storage().data_ptr() in stable_storages
                    for _, term in layer_terms
                    for t in (term.left, term.right)
                )
                target = stable if views and cached is None else volatile
                if target is volatile:
                    volatile_layers.add(record.name)
                for key, term in layer_terms:
                    target.setdefault(key, []).append(term)
                continue
            if not any(id(p) in shared for p in record.params.values()):
                self.joint.append((record, factors))
            else:  # a shared parameter uses the banded/full factors' diagonals
                derived.append((record, *self._diag_of(factors)))
        #: what the caller may pass back as ``cached`` while the factors' storage stays the
        #: same (the layout): the products that view it, and which layers to rebuild anyway
        self.cached_terms = (
            cached if cached is not None else CachedTerms(stable, frozenset(volatile_layers))
        )
        #: undamped (or factored-damped) diagonal curvature per parameter, as broadcast
        #: products; always in the order stable, rebuilt, derived (the same sums every step)
        self.terms: dict[int, list[Term]] = {
            k: list(v) for k, v in self.cached_terms.stable.items()
        }
        for key, terms in volatile.items():
            self.terms.setdefault(key, []).extend(terms)
        for record, H, S in derived:
            for key, term in self._layer_terms(record, H, S):
                self.terms.setdefault(key, []).append(term)
        for key in self.incomplete:
            self.terms.pop(key, None)
        #: global parameter id → this rank's rows (FSDP2), and each local tensor's process group
        self.shards: dict[int, RowShard] = {}
        self._shard_groups: dict[int, object] = {}
        if shards:
            self._add_shards(shards)

    def _add_shards(self, shards: dict[int, RowShard]) -> None:
        """Entries for the rank-local tensors of sharded parameters (keyed by the global
        parameter's id in ``shards``): their rows of the diagonal curvature, their local
        elementwise / fallback curvature. The global entries stay (``dense_diagonal``)."""
        self.shards = shards
        for key, shard in shards.items():
            mine = id(shard.local)
            self._shard_groups[mine] = shard.group
            if key in self.incomplete:
                self.incomplete.add(mine)
            terms = self.terms.get(key)
            if terms is not None and shard.stop > shard.start:
                self.terms[mine] = self._shard_terms(terms, shard)
            for source in (self.elementwise, self.fallback_curvature):
                if key in source:
                    source[mine] = self._local_rows(source[key], shard)

    @staticmethod
    def _local_rows(F: Tensor, shard: RowShard) -> Tensor:
        """This rank's rows of a curvature: its local tensor (a DTensor), or its rows (a whole
        tensor of the parameter's shape, e.g. a fallback computed from gathered state)."""
        if is_sharded(F) or F.dim() == 0 or tuple(F.shape) != tuple(shard.shape):
            return local(F)
        return F[shard.start : shard.stop]

    @staticmethod
    def _shard_terms(terms: list[Term], shard: RowShard) -> list[Term]:
        """The terms of a parameter restricted to this rank's rows ``[start, stop)``: slices of
        the factors (``sharding.shard_rows_of_term``), each with the local rows it fills."""
        out = []
        for term in terms:
            a, b = (0, shard.rows) if term.region is None else span(term.region, shard.rows)
            lo, hi = max(a, shard.start), min(b, shard.stop)
            if lo >= hi:
                continue
            pieces = shard_rows_of_term(term.left, term.right, term.shape, b - a, lo - a, hi - a)
            for rows, left, right in pieces:
                offset = lo - shard.start
                out.append(Term.of(left, right, slice(rows.start + offset, rows.stop + offset)))
        whole = slice(0, shard.stop - shard.start)
        if all(t.region == whole for t in out):  # no packed rows: the plain fast path
            out = [t._replace(region=None) for t in out]
        return out

    def _layer_terms(self, record: LayerRecord, H: Tensor, S: Tensor) -> list[tuple[int, Term]]:
        """(parameter id, product) of every role of one layer."""
        if self.mode == "factored":
            pi = split_pi(H, S)
            root = math.sqrt(self.damping)
            H, S = H + pi * root, S + root / pi
        adapter, module = record.adapter, record.module
        if uses_curvature_terms(adapter):
            terms = adapter.curvature_terms(module, H, S)
        else:  # a plugin that maps factors onto parameters itself
            terms = {r: (v, None) for r, v in adapter.curvature(module, H, S).items()}
        return [
            (id(record.params[role]), Term.of(l, r, record.regions.get(role)))
            for role, (l, r) in terms.items()
        ]

    @staticmethod
    def _diag_of(operator: KroneckerOperator) -> tuple[Tensor, Tensor]:
        """diag(H'), diag(S'), shaped like diagonal factors ((groups, d) → squeeze)."""
        H, S = operator.factor_diagonals()
        return (H[0] if H.shape[0] == 1 else H), S.reshape(-1)

    # -- diagonal curvature into a buffer ------------------------------------------------------
    @staticmethod
    def _write_terms(out: Tensor, terms: list[Term], scale: Tensor | None = None) -> Tensor:
        """``out = scale · Σ left * right`` (in place, viewed as each term's broadcast shape)."""
        if any(t.region is not None for t in terms):
            return CurvaturePreconditioner._write_region_terms(out, terms, scale)
        for k, (left, right, shape, _) in enumerate(terms):
            if scale is not None:
                left = left * scale  # small: a factor vector, not the parameter
            view = out.view(shape)
            if right is None:
                view.copy_(left) if k == 0 else view.add_(left)
            else:
                torch.mul(left, right, out=view) if k == 0 else view.addcmul_(left, right)
        return out

    @staticmethod
    def _write_region_terms(out: Tensor, terms: list[Term], scale: Tensor | None) -> Tensor:
        """:meth:`_write_terms` for a packed parameter: a term with a region writes its rows.
        Regions that tile the rows (each block, possibly several times when tied): the first
        term of each region writes it; anything else (partial overlaps, a term on the whole
        parameter too): zero, then every term adds."""
        rows = out.shape[0]
        written: set[tuple[int, int] | None] = set()
        if not tiles([t.region for t in terms], rows):
            out.zero_()
            written = {None} | {span(t.region, rows) for t in terms if t.region is not None}
        for left, right, shape, region in terms:
            if scale is not None:
                left = left * scale
            rows_span = None if region is None else span(region, rows)
            if rows_span is None:
                view = out.view(shape)
            else:
                view = out[rows_span[0] : rows_span[1]].view(shape)
            first = rows_span not in written
            written.add(rows_span)
            if right is None:
                view.copy_(left) if first else view.add_(left)
            else:
                torch.mul(left, right, out=view) if first else view.addcmul_(left, right)
        return out

    def _terms_dtype(self, key: int) -> torch.dtype:
        return self.terms[key][0][0].dtype

    def _diagonal_denominator(
        self, param: Tensor, power: float, divisor: _Divisor | None
    ) -> Tensor:
        """``(F^p) · d`` of a diagonal-curvature parameter, in its workspace buffer."""
        key = id(param)
        terms = self.terms[key]
        buf = self.workspace.buffer(param, self._terms_dtype(key))
        if self.mode == "after_product" and power == 1.0:
            if divisor is None:
                return self._write_terms(buf, terms).add_(self.damping)
            # (Σ l·r + λ)·d = Σ (l·d)·r + λ·d: d rides on the small factor vectors; an
            # infinite d writes zeros there (not 0·inf = NaN) and λ·d = inf
            return self._write_terms(buf, terms, divisor.finite).add_(divisor.damped)
        self._write_terms(buf, terms)
        buf = self._damp_(buf, power)
        return buf if divisor is None else buf.mul_(divisor.value)

    def _damp_(self, F: Tensor, power: float) -> Tensor:
        """What the update divides by, in place: (F + λ)^p, F^p + λ, or (factored) F^p."""
        if self.mode == "after_product":
            F.add_(self.damping)
            return F if power == 1.0 else F.pow_(power)
        if power != 1.0:
            F.pow_(power)
        return F.add_(self.damping) if self.mode == "after_root" else F

    def _denominator(self, F: Tensor, power: float) -> Tensor:
        """Out-of-place :meth:`_damp_` (for curvature tensors owned by someone else)."""
        return self._damp_(F.clone(), power)

    def _fallback_denominator(self, power: float) -> float:
        return self.fallback_value**power

    def _single_denominator(self, F: Tensor, power: float) -> Tensor:
        """:meth:`_denominator` of a curvature that is not a Kronecker product (a fallback
        policy's): factored damping, which splits λ between two factors, adds λ after it."""
        if self.mode == "factored":
            F = F + self.damping
            return F if power == 1.0 else F.pow_(power)
        return self._denominator(F, power)

    # -- Preconditioner API --------------------------------------------------------------------
    def solve(
        self, params: list[Tensor], tensors: list[Tensor], power: float = 1.0
    ) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(params)
        self._solve_joint(params, tensors, power, out)
        diag_idx, dens = [], []
        for i, p in enumerate(params):
            if out[i] is not None:
                continue
            den = self._elementwise_or_diagonal(p, power, None)
            if den is not None:
                diag_idx.append(i)
                dens.append(den)
        if diag_idx:
            solved = torch._foreach_div([tensors[i] for i in diag_idx], dens)
            for i, s in zip(diag_idx, solved):
                out[i] = s
        rest = [i for i in range(len(params)) if out[i] is None]
        if rest:
            solved = torch._foreach_div(
                [tensors[i] for i in rest], self._fallback_denominator(power)
            )
            for i, s in zip(rest, solved):
                out[i] = s
        return out  # type: ignore[return-value]

    def add_solved_(
        self,
        params: list[Tensor],
        tensors: list[Tensor],
        alpha: float,
        power: float = 1.0,
        divisors: list[Tensor] | None = None,
    ) -> None:
        """``θ += α · F^{-p} v / d`` for every (θ, v, d): one fused pass per diagonal parameter
        (``_foreach_addcdiv_`` against the reused denominator buffers); ``d = inf`` leaves θ
        unchanged."""
        joint: list[Tensor | None] = [None] * len(params)
        self._solve_joint(params, tensors, power, joint)
        prepared = self._prepare_divisors(divisors) if divisors is not None else None
        same_p, same_v, same_den = [], [], []
        for i, p in enumerate(params):
            divisor = None if prepared is None else prepared[i]
            if joint[i] is not None:
                solved = joint[i].to(p.dtype)
                if divisor is None:
                    p.add_(solved, alpha=alpha)
                elif divisor.value.dtype == p.dtype:  # one pass; d = inf leaves θ unchanged
                    p.addcdiv_(solved, divisor.value, value=alpha)
                else:
                    p.add_((joint[i] / divisor.value).to(p.dtype), alpha=alpha)
                continue
            den = self._elementwise_or_diagonal(p, power, divisor)
            if den is None:
                value = self._fallback_denominator(power)
                den = torch.full(
                    (), value, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
                )
                den = den if divisor is None else den * divisor.value
            if den.dim() and den.dtype == p.dtype == tensors[i].dtype:
                same_p.append(p)
                same_v.append(tensors[i])
                same_den.append(den)
            else:  # a fallback scalar, or mixed precision: compute in the curvature's dtype
                p.add_((tensors[i].to(den.dtype) / den).to(p.dtype), alpha=alpha)
        if same_p:
            torch._foreach_addcdiv_(same_p, same_v, same_den, value=alpha)

    def _prepare_divisors(self, divisors: list[Tensor]) -> list[_Divisor]:
        """Each divisor with its finite part and λ·d, computed for all parameters at once."""
        by_dtype: dict[tuple, list[int]] = {}
        for i, d in enumerate(divisors):
            by_dtype.setdefault((d.dtype, d.device), []).append(i)
        out: list[_Divisor | None] = [None] * len(divisors)
        for indices in by_dtype.values():
            d = torch.stack([divisors[i] for i in indices])
            finite = d.nan_to_num(posinf=0.0).unbind()
            damped = (d * self.damping).unbind()
            for k, i in enumerate(indices):
                out[i] = _Divisor(divisors[i], finite[k], damped[k])
        return out  # type: ignore[return-value]

    def _elementwise_or_diagonal(
        self, param: Tensor, power: float, divisor: _Divisor | None
    ) -> Tensor | None:
        """What ``param``'s update divides by (times the divisor), or None (no curvature)."""
        F = self.elementwise.get(id(param))
        if F is not None:
            den = self._denominator(F, power)
            return den if divisor is None else den.mul_(divisor.value)
        if id(param) in self.terms:
            return self._diagonal_denominator(param, power, divisor)
        F = self.fallback_curvature.get(id(param))
        if F is not None:
            den = self._single_denominator(F, power)
            return den if divisor is None else den.mul_(divisor.value)
        return None

    def _solve_joint(
        self, params: list[Tensor], tensors: list[Tensor], power: float, out: list
    ) -> None:
        """Banded/full layers: weight and bias as one matrix, solved by the layer's operator.

        A parameter sharded by FSDP2 enters as its local rows. Where the operator can, the
        layer is solved on the rows (:meth:`_solve_rows`); otherwise its tensors are gathered
        whole (one all-gather per parameter, the same layers in the same order on every rank),
        solved whole, and the rank keeps its rows (``sharding.gather_rows``;
        docs/distributed.md)."""
        index = {id(p): i for i, p in enumerate(params)}
        for key, shard in self.shards.items():  # a sharded parameter is passed as its rows
            if id(shard.local) in index:
                index[key] = index[id(shard.local)]
        whole: dict[int, Tensor] = {}  # gathered tensors of sharded parameters, by position
        rows: dict[int, RowShard] = {}

        def source(i: int, p: Tensor) -> Tensor:
            shard = self.shards.get(id(p))
            if shard is None:
                return tensors[i]
            if i not in whole:
                whole[i], rows[i] = gather_rows(tensors[i], shard), shard
            return whole[i]

        jobs, operators, matrices = [], [], []
        for record, operator in self.joint:
            roles = {
                r: index[id(p)]
                for r, p in record.params.items()
                if id(p) in index and id(p) not in self.incomplete
            }
            if not roles:
                continue
            if self._solve_rows(record, operator, roles, tensors, power, out):
                continue
            regions = record.regions
            inputs = {r: source(i, record.params[r]) for r, i in roles.items()}
            columns = record.adapter.matrix_columns(
                record.module, {r: rows_of(v, regions.get(r)) for r, v in inputs.items()}
            )
            columns = [c.to(operator.dtype) for c in columns]
            jobs.append((record, roles))
            operators.append(operator)
            matrices.append(columns if operator.accepts_columns else as_matrix(columns))
        # layers whose operators share a batch (equal shapes) are solved as one
        solved_whole: list[Tensor | None] = [None] * len(out)  # sharded: the whole solution
        for (record, roles), solved in zip(jobs, solve_all(operators, matrices, power)):
            regions = record.regions
            if isinstance(solved, list):  # blocks of columns, as matrix_columns gave them
                pieces = record.adapter.from_columns(record.module, solved)
            else:
                pieces = record.adapter.from_matrix(record.module, solved)
            for role, i in roles.items():
                target = solved_whole if i in whole else out
                piece = pieces[role].to(tensors[i].dtype)
                region = regions.get(role)
                if region is None:
                    target[i] = piece
                else:  # one block of a packed parameter: the other blocks fill the other rows
                    if target[i] is None:
                        target[i] = torch.empty_like(whole.get(i, tensors[i]))
                    target[i][region] = piece
        for i, shard in rows.items():  # this rank's rows of the whole solution
            if solved_whole[i] is not None:
                out[i] = solved_whole[i][shard.start : shard.stop]

    def _solve_rows(
        self,
        record: LayerRecord,
        operator: KroneckerOperator,
        roles: dict[str, int],
        tensors: list[Tensor],
        power: float,
        out: list,
    ) -> bool:
        """The sharded solve of a layer whose parameters are all sharded by the same rows
        (``sharding.SHARDED_SOLVE``; docs/distributed.md): the operator multiplies this rank's
        rows where they lie and gathers only the product that mixes rows. False (nothing done)
        where it does not apply: the operator has no row solve, ``p ≠ 1``, packed regions,
        convolution groups, an adapter with its own matrix layout, a parameter not sharded or
        sharded by other rows."""
        if not sharding.SHARDED_SOLVE or power != 1.0 or not hasattr(operator, "solve_rows"):
            return False
        adapter, module = record.adapter, record.module
        if (
            record.regions
            or adapter.groups(module) != 1
            or not adapter.default_matrix_layout
            or set(roles) != set(adapter.parameters(module))
        ):
            return False
        shards = [self.shards.get(id(record.params[r])) for r in roles]
        first = shards[0]
        if first is None or any(
            s is None or (s.start, s.stop, s.rows) != (first.start, first.stop, first.rows)
            for s in shards
        ):
            return False
        local = {r: tensors[i] for r, i in roles.items()}
        columns = [c.to(operator.dtype) for c in adapter.matrix_columns(module, local)]
        solved = operator.solve_rows(
            columns, first.start, first.stop, partial(gather_row_blocks, shard=first)
        )
        pieces = adapter.from_columns(module, solved)
        for role, i in roles.items():
            out[i] = pieces[role].to(tensors[i].dtype)
        return True

    def shard_group(self, param: Tensor) -> object | None:
        return self._shard_groups.get(id(param))

    def dense_diagonal(self, param: Tensor) -> Tensor:
        """diag(F), damping included, such that the update divides by ``F^p`` — except with
        ``after_root`` damping, where the update divides by ``F^p + λ`` and this returns F."""
        F = self.elementwise.get(id(param))
        if F is None and id(param) in self.terms:
            F = self._write_terms(
                torch.empty(param.shape, dtype=self._terms_dtype(id(param)), device=param.device),
                self.terms[id(param)],
            )
        if F is None and id(param) not in self.incomplete:
            found = None
            for record, factors in self.joint:
                for role, p in record.params.items():
                    if p is param:
                        piece = self._joint_diagonal(record, factors)[role]
                        region = record.regions.get(role)
                        if region is None:
                            return piece
                        if found is None:
                            found = torch.empty(param.shape, dtype=piece.dtype, device=piece.device)
                        found[region] = piece
            if found is not None:
                return found
        if F is None:
            F = self.fallback_curvature.get(id(param))
            if F is not None:
                if self.mode == "after_root":
                    return F
                return F + self.damping  # after the product, also for factored damping
            return torch.full_like(
                param, self.fallback_value, dtype=torch.promote_types(param.dtype, torch.float32)
            )
        if self.mode == "after_product":
            return F + self.damping
        return F

    def _joint_diagonal(
        self, record: LayerRecord, operator: KroneckerOperator
    ) -> dict[str, Tensor]:
        return record.adapter.from_matrix(record.module, operator.damped_diagonal())
