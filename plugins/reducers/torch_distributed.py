"""Data-parallel reducer on ``torch.distributed``: one coalesced all-reduce per curvature update.

Every rank hands the optimizer's reducer the same list of per-layer statistic *totals* (sums over
its own rows) and row *counts*. The reducer packs all of them into one flat buffer per bucket,
appends the counts to it, and sums the buffer across the ranks of a process group with a single
``all_reduce`` per bucket (SUM). Afterwards each layer's mean is ``Σ_ranks total / Σ_ranks count``,
i.e. the mean over every row of every rank: ranks with fewer rows (an unequal last batch) weigh
less, exactly as if one process had seen the whole global batch (docs/distributed.md).

Finite flag: :meth:`all_finite` sums a per-rank "saw a non-finite value" indicator across ranks
(equivalent to a MIN/AND of the finite flags), so a step that is non-finite on any rank is skipped
on all ranks and the ranks never diverge; the skip is logged. :meth:`reduce_with_flag` carries the
same indicator inside the statistics buffer, so a curvature step then costs one collective in all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.interfaces.reducer import Reducer
from curvlab.plugins.reducers import refresh_split
from curvlab.plugins.reducers.backward_overlap import BackwardOverlap, overlap_group
from curvlab.registry import register

logger = logging.getLogger(__name__)

FINITE_FLAG_MODES = ("all_reduce", "local")
#: bucket cap of ``overlap_backward`` when ``bucket_size_mb`` is None
OVERLAP_BUCKET_MB = 4.0


@dataclass
class _Bucket:
    """Tensors ``indices`` of one (device, dtype), flattened together with their counts.

    ``dtype`` is the dtype on the wire: fp16/bf16 statistics travel as fp32 (their counts would
    not be exact otherwise) and are cast back after the reduction.
    """

    device: torch.device
    dtype: torch.dtype
    source_dtype: torch.dtype
    indices: list[int] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class PendingReduction:
    """An all-reduce in flight (from :meth:`TorchDistributedReducer.launch`); ``wait()`` unpacks it.

    Until ``wait()`` returns, the inputs' sums are not available; the inputs themselves are not
    modified (the collective works on a packed copy).
    """

    _reducer: TorchDistributedReducer
    _shapes: list[torch.Size]
    _buckets: list[_Bucket]
    _buffers: list[Tensor]
    _works: list[Any]
    _flag_slot: tuple[int, int] | None = None  # (bucket, position) of the non-finite indicator
    _result: tuple[list[Tensor], list[Tensor], Tensor | None] | None = None

    def wait(self) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """(summed totals, summed counts as 0-dim tensors, combined finite flag or None)."""
        if self._result is None:
            n = len(self._shapes)
            totals: list[Tensor | None] = [None] * n
            counts: list[Tensor | None] = [None] * n
            for bucket, buffer, work in zip(self._buckets, self._buffers, self._works, strict=True):
                self._reducer._wait(work, buffer.device)
                self._reducer._unpack(bucket, buffer, self._shapes, totals, counts)
            flag = None
            if self._flag_slot is not None:
                b, pos = self._flag_slot
                flag = self._buffers[b][pos] == 0
            self._result = (totals, counts, flag)  # type: ignore[assignment]
        return self._result


LOSS_CONVENTIONS = ("global", "local_mean")


@register("reducers", "torch_distributed")
class TorchDistributedReducer(Reducer):
    r"""Sums statistic totals and row counts over the ranks of a ``torch.distributed`` group.

    Per curvature update (the optimizer calls :meth:`reduce` only then), the totals of every layer
    and their counts are flattened into one buffer per (device, dtype) — or into several buckets of
    at most ``bucket_size_mb`` when that is set — and summed with **one** ``all_reduce`` per
    bucket, never one per layer. The collectives of all buckets are launched back to back
    (``async_op=True``) and waited for in order. The layer means that follow are

    .. math:: \hat H = \frac{\sum_r \sum_{i \in r} \bar a_i^2}{\sum_r N_r},

    the mean over the rows of all ranks (weighted by sample count), identical to one process on
    the concatenated batch when every rank's output gradients are those of the global loss
    (docs/distributed.md, "Loss scaling").

    Any estimator structure works (the reducer only sees a list of tensors): diagonal vectors,
    banded storage, full matrices. Counts travel as floating-point values of the bucket's dtype
    (exact up to 2²⁴ rows in fp32, 2⁵³ in fp64); fp16/bf16 statistics travel as fp32.

    Args:
        group: the process group (default: ``torch.distributed.group.WORLD``). Not gin-bindable;
            pass an instance to the optimizer's ``reducer=`` to use a sub-group.
        bucket_size_mb: cap of one bucket in MiB (a tensor larger than the cap gets a bucket of
            its own). ``None`` (default): one bucket per (device, dtype), i.e. one collective.
        finite_flag: ``"all_reduce"`` (default) makes :meth:`all_finite` a tiny collective every
            step; ``"local"`` trusts that every input of the flag is already identical on all
            ranks (gradients averaged by DDP, statistics reduced here) and communicates nothing.
        pack_symmetric: send only the upper triangle of every tensor whose last two dimensions
            are equal (about half the bytes for full K-FAC factors). Opt-in: only correct when
            all such tensors are symmetric, which holds for the ``full`` estimator's
            ``Σ ā āᵀ`` / ``Σ g gᵀ``, not in general — never with ``banded``, whose
            ``(b+1, d)`` band storage is square (and not symmetric) when ``b = d − 1``.
        loss_convention: ``"global"`` (default): every rank's output gradients are those of the
            global loss (each rank's loss summed over its samples and divided by the global
            batch, gradients summed across ranks). ``"local_mean"``: the usual DDP recipe, each
            rank's loss is the mean over its own samples (gradients averaged by DDP), so its
            output gradients are W times those of the global loss; output statistics (the odd
            entries, ``Σ g²``) are divided by W² before the sum. ``curvlab run`` under torchrun
            uses ``"local_mean"``.
        validate: before every reduction, check with one extra small collective that all ranks
            pass the same layout (number and shapes of tensors); a mismatch raises instead of
            hanging or mixing layers. For debugging.
        log_skips: log a warning (logger ``curvlab.plugins.reducers.torch_distributed``) for every
            step skipped on a non-finite value. On CPU the flag is read at once; on CUDA it is
            copied to pinned memory without blocking and logged at a later call, so logging adds
            no host–device synchronisation.
        timeout_s: the longest wait for a collective of CPU tensors (gloo) before it raises
            ``RuntimeError("... timed out ...")``; ``None`` (default): the process group's timeout
            (``init_process_group(timeout=...)``; ``curvlab run`` sets it from
            ``train.distributed_timeout_s``). CUDA tensors always use the process group's
            timeout: a timed wait on an NCCL collective blocks the host, a synchronisation
            every step.
        split_inverses: KAISA's split of the banded/full refresh (eigendecompositions,
            inverses): each layer is refreshed on one rank (largest first to the least-loaded)
            and the results are broadcast (:mod:`curvlab.plugins.reducers.refresh_split`).
            Same results as every rank refreshing every layer; ``False`` (default) keeps that.
        overlap_backward: launch the statistics all-reduce during the backward pass, a bucket
            as soon as its layers' statistics of this backward are complete (buckets of
            ``bucket_size_mb``, default 4 MiB here), on a process group of its own; ``step()``
            waits and adds the sums of the backward passes since the last step
            (:mod:`curvlab.plugins.reducers.backward_overlap`; the same numbers up to the order
            of additions). The finite flag is then its own small collective per step (unless
            ``finite_flag="local"``). Needs the same layers captured in the same order on every
            rank, as DDP does. With a ``group`` given, that group carries the collectives;
            without, every process of the job must build the reducer (a ``new_group`` call).

    Raises:
        RuntimeError: if ``torch.distributed`` is unavailable or not initialised.
    """

    def __init__(
        self,
        group: Any = None,
        bucket_size_mb: float | None = None,
        finite_flag: str = "all_reduce",
        pack_symmetric: bool = False,
        validate: bool = False,
        log_skips: bool = True,
        loss_convention: str = "global",
        timeout_s: float | None = None,
        split_inverses: bool = False,
        overlap_backward: bool = False,
    ) -> None:
        if not dist.is_available():
            raise RuntimeError(
                "reducer 'torch_distributed': this PyTorch build has no torch.distributed; "
                "use reducer='none' for one process"
            )
        if not dist.is_initialized():
            raise RuntimeError(
                "reducer 'torch_distributed': torch.distributed is not initialized. Start the "
                "processes with torchrun (or set MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE) and call "
                "torch.distributed.init_process_group(backend='nccl' or 'gloo') before building "
                "the optimizer; for one process use reducer='none'"
            )
        if bucket_size_mb is not None and not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0 or None, got {bucket_size_mb!r}")
        if finite_flag not in FINITE_FLAG_MODES:
            raise ValueError(f"finite_flag must be one of {FINITE_FLAG_MODES}, got {finite_flag!r}")
        if loss_convention not in LOSS_CONVENTIONS:
            raise ValueError(
                f"loss_convention must be one of {LOSS_CONVENTIONS}, got {loss_convention!r}"
            )
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.split_inverses = bool(split_inverses)
        self.loss_convention = loss_convention
        self.group = group
        self.bucket_size_mb = bucket_size_mb
        self.finite_flag = finite_flag
        self.pack_symmetric = bool(pack_symmetric)
        self.validate = bool(validate)
        self.log_skips = bool(log_skips)
        #: collectives issued and bytes sent per rank (payload of the buffers), for measurements
        self.collectives = 0
        self.bytes_reduced = 0
        #: payload bytes of each bucket of the last reduction (one collective each)
        self.last_bucket_bytes: list[int] = []
        self._steps = 0  # all_finite calls, i.e. optimizer steps
        self._pending_logs: list[tuple[int, Tensor, Any, bool]] = []
        self._triu_cache: dict[tuple[int, torch.device], Tensor] = {}
        self.overlap_backward = bool(overlap_backward)
        #: the overlap engine (None: everything is reduced in step(); always with one rank)
        self.overlap: BackwardOverlap | None = None
        if self.overlap_backward and self.world_size > 1:
            cap = OVERLAP_BUCKET_MB if bucket_size_mb is None else bucket_size_mb
            self.overlap = BackwardOverlap(self, overlap_group(group), cap * 2**20)

    def _to_global_loss(self, totals: list[Tensor]) -> list[Tensor]:
        """Under ``loss_convention="local_mean"``: output statistics ÷ W² (see the class doc);
        applied once, by whichever of reduce / reduce_with_flag is called."""
        if self.loss_convention == "global":
            return list(totals)
        w2 = float(self.world_size) ** 2
        return [t / w2 if i % 2 else t for i, t in enumerate(totals)]

    # -- group ------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def split_refresh(self, costs: list[float]) -> list[int] | None:
        if not self.split_inverses or self.world_size == 1:
            return None
        return refresh_split.assign_owners(costs, self.world_size)

    def share(
        self, tensors: list[Tensor | None], owners: list[int], device: torch.device
    ) -> list[Tensor]:
        return refresh_split.share(tensors, owners, self.group, device)

    # -- statistics reduced during backward (overlap_backward) ------------------------------------
    def attach(self, layers: Sequence[Any]) -> None:
        if self.overlap is not None:
            self.overlap.attach(layers)

    def detach(self) -> None:
        if self.overlap is not None:
            self.overlap.detach()

    def take_reduced(self) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        return {} if self.overlap is None else self.overlap.take()

    def discard_reduced(self) -> None:
        if self.overlap is not None:
            self.overlap.discard()

    def launch_for_overlap(
        self, totals: list[Tensor], counts: Sequence[int | Tensor], group: Any
    ) -> PendingReduction:
        """:meth:`launch` of one overlap bucket on ``group``: one collective per
        (device, dtype), loss convention applied as in :meth:`reduce`."""
        return self.launch(self._to_global_loss(totals), counts, group=group, split=False)

    def _all_reduce(self, tensor: Tensor, async_op: bool = False, group: Any = None):  # noqa: ANN202
        self.collectives += 1
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        group = self.group if group is None else group
        # looked up at call time on the module, so tests can count the calls
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        if async_op:
            return work
        self._wait(work, tensor.device)
        return None

    def _wait(self, work: Any, device: torch.device) -> None:
        """Wait for ``work``, at most ``timeout_s`` for CPU tensors (see the class doc)."""
        if work is None:
            return
        if self.timeout_s is not None and device.type == "cpu":
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        else:
            work.wait()

    # -- reduction --------------------------------------------------------------------------------
    def reduce(
        self, totals: list[Tensor], counts: Sequence[int | Tensor]
    ) -> tuple[list[Tensor], list[int | Tensor]]:
        """Σ over ranks of every total and count (counts come back as 0-dim tensors)."""
        totals = self._to_global_loss(totals)
        if not dist.is_initialized():
            raise RuntimeError("reducer 'torch_distributed': the process group was destroyed")
        if not totals or self.world_size == 1:
            return list(totals), list(counts)
        reduced, reduced_counts, _ = self.launch(totals, counts).wait()
        return reduced, reduced_counts

    def reduce_with_flag(
        self, totals: list[Tensor], counts: Sequence[int | Tensor], flag: Tensor
    ) -> tuple[list[Tensor], list[int | Tensor], Tensor]:
        """:meth:`reduce` and :meth:`all_finite` in the same collective.

        ``flag`` is this rank's finite flag (0-dim bool, e.g. over its gradients and its local
        totals); the returned flag is True only if it was True on every rank. A non-finite total
        on any rank also makes the summed totals non-finite on every rank.
        """
        if not totals or self.finite_flag == "local":
            reduced, reduced_counts = self.reduce(totals, counts) if totals else ([], list(counts))
            return reduced, reduced_counts, self.all_finite(flag)
        if self.world_size == 1:
            return list(totals), list(counts), self._log_if_skipped(flag, ~flag, flag)
        totals = self._to_global_loss(totals)
        reduced, reduced_counts, all_ok = self.launch(totals, counts, flag=flag).wait()
        assert all_ok is not None
        return reduced, reduced_counts, self._log_if_skipped(all_ok, ~flag, all_ok)

    def launch(
        self,
        totals: list[Tensor],
        counts: Sequence[int | Tensor],
        flag: Tensor | None = None,
        group: Any = None,
        split: bool = True,
    ) -> PendingReduction:
        """Pack and start the all-reduce of every bucket without waiting (``async_op=True``).

        The caller may do other work and then call ``wait()`` on the result; :meth:`reduce` is
        ``launch(...).wait()``. With a ``flag``, the rank's non-finite indicator rides in the
        first bucket. ``group``: another process group than the reducer's; ``split=False``:
        one bucket per (device, dtype) whatever ``bucket_size_mb``.
        """
        if len(totals) != len(counts):
            raise ValueError(f"{len(totals)} totals but {len(counts)} counts")
        if self.validate:
            self._check_layout(totals, group)
        shapes = [t.shape for t in totals]
        buckets = self._plan(totals, split)
        buffers, works = [], []
        flag_slot = None
        for b, bucket in enumerate(buckets):
            extra = None
            if flag is not None and b == 0:
                extra = (~flag).to(device=bucket.device, dtype=bucket.dtype).reshape(1)
            buffer = self._pack(bucket, totals, counts, extra)
            if extra is not None:
                flag_slot = (0, buffer.numel() - 1)
            buffers.append(buffer)
            works.append(self._all_reduce(buffer, async_op=True, group=group))
        self.last_bucket_bytes = [b.numel() * b.element_size() for b in buffers]
        return PendingReduction(self, shapes, buckets, buffers, works, flag_slot)

    def _plan(self, totals: list[Tensor], split: bool = True) -> list[_Bucket]:
        """Group tensors by (device, dtype) in order; split a group at ``bucket_size_mb``."""
        cap = None if self.bucket_size_mb is None or not split else self.bucket_size_mb * 2**20
        open_buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        buckets: list[_Bucket] = []
        for i, t in enumerate(totals):
            if not t.is_floating_point():
                raise TypeError(
                    f"reducer 'torch_distributed': statistic {i} has dtype {t.dtype}; "
                    f"totals must be floating point"
                )
            key = (t.device, t.dtype)
            wire = torch.float32 if t.element_size() < 4 else t.dtype
            size = (self._packed_numel(t) + 1) * max(t.element_size(), 4)
            bucket = open_buckets.get(key)
            full = cap is not None and bucket is not None and bucket.nbytes + size > cap
            if bucket is None or full:
                bucket = _Bucket(t.device, wire, t.dtype)
                open_buckets[key] = bucket
                buckets.append(bucket)
            bucket.indices.append(i)
            bucket.nbytes += size
        return buckets

    def _is_packed(self, t: Tensor) -> bool:
        return self.pack_symmetric and t.dim() >= 2 and t.shape[-1] == t.shape[-2] > 1

    def _packed_numel(self, t: Tensor) -> int:
        if self._is_packed(t):
            d = t.shape[-1]
            return math.prod(t.shape[:-2]) * d * (d + 1) // 2
        return t.numel()

    def _triu(self, d: int, device: torch.device) -> Tensor:
        key = (d, device)
        if key not in self._triu_cache:
            self._triu_cache[key] = torch.triu_indices(d, d, device=device)
        return self._triu_cache[key]

    def _pack(
        self,
        bucket: _Bucket,
        totals: list[Tensor],
        counts: Sequence[int | Tensor],
        extra: Tensor | None,
    ) -> Tensor:
        parts = []
        for i in bucket.indices:
            t = totals[i]
            if self._is_packed(t):
                rows, cols = self._triu(t.shape[-1], t.device)
                parts.append(t[..., rows, cols].reshape(-1))
            else:
                parts.append(t.reshape(-1))
        if bucket.dtype != bucket.source_dtype:
            parts = [part.to(bucket.dtype) for part in parts]
        parts.append(self._counts_tensor([counts[i] for i in bucket.indices], bucket))
        if extra is not None:
            parts.append(extra)
        return torch.cat(parts)

    @staticmethod
    def _counts_tensor(counts: list[int | Tensor], bucket: _Bucket) -> Tensor:
        if all(isinstance(c, Tensor) for c in counts):
            return torch.stack([c.to(device=bucket.device, dtype=bucket.dtype) for c in counts])
        values = [float(c.item()) if isinstance(c, Tensor) else float(c) for c in counts]
        host = torch.tensor(values, dtype=bucket.dtype)
        if bucket.device.type == "cuda":  # no blocking host-to-device copy
            return host.pin_memory().to(bucket.device, non_blocking=True)
        return host.to(bucket.device)

    def _unpack(
        self,
        bucket: _Bucket,
        buffer: Tensor,
        shapes: list[torch.Size],
        totals: list[Tensor | None],
        counts: list[Tensor | None],
    ) -> None:
        offset = 0
        for i in bucket.indices:
            shape = shapes[i]
            if self.pack_symmetric and len(shape) >= 2 and shape[-1] == shape[-2] > 1:
                d = shape[-1]
                n = math.prod(shape[:-2]) * d * (d + 1) // 2
                values = buffer[offset : offset + n].reshape(*shape[:-2], -1)
                rows, cols = self._triu(d, buffer.device)
                full = buffer.new_empty(shape)
                full[..., rows, cols] = values
                full[..., cols, rows] = values
                totals[i] = full
            else:
                n = math.prod(shape)
                totals[i] = buffer[offset : offset + n].view(shape)
            if bucket.dtype != bucket.source_dtype:
                totals[i] = totals[i].to(bucket.source_dtype)
            offset += n
        for j, i in enumerate(bucket.indices):
            counts[i] = buffer[offset + j]

    def _check_layout(self, totals: list[Tensor], group: Any = None) -> None:
        """All ranks must pack the same tensors: compare (count, Σ numel, a shape fingerprint)."""
        fingerprint = 0
        for t in totals:
            for s in (t.dim(), *t.shape):
                fingerprint = (fingerprint * 1_000_003 + s) % 2_147_483_647
        mine = [len(totals), sum(t.numel() for t in totals), fingerprint]
        device = totals[0].device
        probe = torch.tensor(mine + [-v for v in mine], dtype=torch.int64, device=device)
        self.collectives += 1
        group = self.group if group is None else group
        work = dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group, async_op=True)
        self._wait(work, device)
        high, neg_low = probe[:3].tolist(), probe[3:].tolist()
        if high != mine or [-v for v in neg_low] != mine:
            raise RuntimeError(
                f"reducer 'torch_distributed': rank {self.rank} passes (tensors, elements, shape "
                f"fingerprint) = {mine} but another rank differs (max {high}, min "
                f"{[-v for v in neg_low]}): every rank must capture the same layers in a "
                f"curvature step"
            )

    # -- finite flag ------------------------------------------------------------------------------
    def all_finite(self, flag: Tensor) -> Tensor:
        """True only if ``flag`` is True on every rank (a SUM of non-finite indicators == 0)."""
        if self.finite_flag == "local" or self.world_size == 1:
            return self._log_if_skipped(flag, ~flag, flag)
        bad = (~flag).to(torch.int32).reshape(1)
        self._all_reduce(bad)
        all_ok = bad[0] == 0
        return self._log_if_skipped(all_ok, ~flag, all_ok)

    def _log_if_skipped(self, all_ok: Tensor, local_bad: Tensor, result: Tensor) -> Tensor:
        step = self._steps
        self._steps += 1
        if not self.log_skips:
            return result
        self._drain_logs()
        info = torch.stack([(~all_ok).to(torch.int32), local_bad.to(torch.int32).reshape(())])
        if info.device.type == "cuda":
            host = torch.empty(info.shape, dtype=info.dtype, pin_memory=True)
            host.copy_(info, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_logs.append((step, host, event, False))
        else:
            self._emit(step, info)
        return result

    def _drain_logs(self, block: bool = False) -> None:
        while self._pending_logs:
            step, host, event, _ = self._pending_logs[0]
            if not block and not event.query():
                return
            event.synchronize()
            self._pending_logs.pop(0)
            self._emit(step, host)

    def flush_logs(self) -> None:
        """Log the skips still waiting on the device (CUDA); blocks until they are known."""
        self._drain_logs(block=True)

    def _emit(self, step: int, info: Tensor) -> None:
        skipped, local_bad = (bool(v) for v in info.tolist())
        if skipped:
            where = "on this rank" if local_bad else "on another rank"
            logger.warning(
                "step %d skipped on all %d ranks: a non-finite value was found %s (rank %d)",
                step,
                self.world_size,
                where,
                self.rank,
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bucket_size_mb={self.bucket_size_mb}, "
            f"finite_flag={self.finite_flag!r}, pack_symmetric={self.pack_symmetric}, "
            f"overlap_backward={self.overlap_backward})"
        )
