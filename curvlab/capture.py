"""Capture engine: forward hooks plus tensor hooks on layer outputs (as curvlinops does).

The forward hook computes the input statistic at once (so nothing extra is kept alive) and
registers a hook on the *output tensor*; that hook computes the output-gradient statistic and
commits the pair. Tensor hooks survive in-place ops on the output (they receive the gradient
w.r.t. the tensor before modification), unlike ``register_full_backward_hook``. A forward whose
output never receives a gradient commits nothing, so input and output statistics always pair.

Functional layers (``LayerAdapter.capture_forward``, e.g. ``nn.MultiheadAttention``, whose q, k,
v projections happen inside its forward) get no forward hook: while the engine is attached, the
module's ``forward`` is a :class:`CapturingForward`, which runs the adapter's observable forward
when statistics are gathered and the module's own forward otherwise. Each block the adapter
observes goes through the same path as a forward hook (:meth:`CaptureEngine._forward_hook`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.interfaces.estimator import FactorEstimator
from curvlab.layers import LayerRecord


def statistics_dtype(module: nn.Module) -> torch.dtype:
    """Factors are kept in fp32 (fp64 for fp64 models), whatever autocast computes in."""
    for p in module.parameters(recurse=False):
        if p.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Statistics are computed outside autocast; entering the context only when autocast is on
    keeps the per-hook overhead down."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _never() -> bool:
    return False


class CaptureEngine:
    """Hooks a list of :class:`LayerRecord` and feeds them statistics while ``is_active()``.

    Statistics are gathered only when grad is enabled, the module is in training mode and the
    optimizer says this is a curvature step.
    """

    def __init__(self) -> None:
        self._handles: list = []
        self._forwards: list[CapturingForward] = []
        #: per thread, the last shareable input statistic: (weakref to the input, its
        #: version, (signature, dtype), statistic)
        self._last_input = threading.local()
        self._estimator: FactorEstimator | None = None
        self._is_active: Callable[[], bool] = lambda: False

    def attach(
        self,
        layers: Sequence[LayerRecord],
        estimator: FactorEstimator,
        is_active: Callable[[], bool],
    ) -> None:
        self.detach()
        self._estimator = estimator
        self._is_active = is_active
        functional: dict[int, list[LayerRecord]] = {}
        by_module: dict[int, list[LayerRecord]] = {}
        for record in layers:
            by_module.setdefault(id(record.module), []).append(record)
            if record.adapter.captures_forward:  # one forward override per module, all blocks
                functional.setdefault(id(record.module), []).append(record)
                continue
            dtype = statistics_dtype(record.module)
            handle = record.module.register_forward_hook(partial(self._forward_hook, record, dtype))
            self._handles.append(handle)
        for records in functional.values():
            # direct submodules that are layers themselves: observable by their name too
            children = {
                ".".join(part for part in (child_name, r.block) if part): r
                for child_name, child in records[0].module.named_children()
                for r in by_module.get(id(child), ())
            }
            self._forwards.append(CapturingForward.install(self, records, children))

    def detach(self) -> None:
        """Remove every hook and forward override this engine installed (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for forward in self._forwards:
            forward.uninstall()
        self._forwards.clear()

    def capturing(self, module: nn.Module) -> bool:
        """Whether a forward of ``module`` now gathers statistics (curvature step, not paused,
        training mode, grad enabled)."""
        return self._is_active() and module.training and torch.is_grad_enabled()

    def __getstate__(self) -> dict:
        # pickling a hooked model (torch.save(model)) pickles its hooks and so this engine.
        # The copy is attached to no optimizer: its hooks stay inert (and the optimizer is
        # not dragged into the pickle); the per-thread cache is not picklable
        state = self.__dict__.copy()
        del state["_last_input"]
        state["_is_active"] = _never
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._last_input = threading.local()

    def __deepcopy__(self, memo: dict) -> CaptureEngine:
        # copying a hooked model (EMA/SWA copies) copies its hooks; they keep pointing at this
        # engine, and _forward_hook ignores the copy's modules (they are not record.module)
        return self

    def _forward_hook(
        self, record: LayerRecord, dtype: torch.dtype, module: nn.Module, inputs: tuple, output
    ) -> None:
        if module is not record.module:  # a deep copy of the hooked module
            return
        if not self.capturing(module):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        x = inputs[0]
        signature = record.adapter.input_signature(module)
        # inference tensors have no version counter: never shared
        if signature is not None and (not isinstance(x, Tensor) or x.is_inference()):
            signature = None
        # the adapter class is part of the key: a subclass may inherit the signature but
        # compute another statistic
        key = None if signature is None else (type(record.adapter), signature)
        last = getattr(self._last_input, "value", None)  # unset in a new thread
        same = last is not None and key is not None and last[0]() is x
        if same and last[1] == x._version and last[2] == (key, dtype):
            input_stat = last[3]  # the same tensor, unchanged, read the same way: share
        else:
            # under no_grad rather than on detached tensors: the adapter may read the output's
            # autograd node (BatchNorm's saved batch statistics)
            with torch.no_grad(), _no_autocast(output.device.type):
                input_stat = self._estimator.input_statistic(
                    record.adapter, module, x, output, dtype
                )
            if key is not None:
                self._last_input.value = (weakref.ref(x), x._version, (key, dtype), input_stat)
        record.pending += 1
        output.register_hook(partial(self._output_hook, record, dtype, input_stat))

    def _output_hook(
        self, record: LayerRecord, dtype: torch.dtype, input_stat, grad: Tensor
    ) -> None:
        with _no_autocast(grad.device.type):
            output_stat = self._estimator.output_statistic(
                record.adapter, record.module, grad.detach(), dtype
            )
        record.pending -= 1
        record.accumulate(input_stat, output_stat)
        if record.on_statistics is not None:
            record.on_statistics(record)


class CapturingForward:
    """The ``forward`` of a functional layer while a :class:`CaptureEngine` is attached.

    Installed as an instance attribute (``module.forward``), so ``nn.Module.__call__`` and its
    hooks are unchanged. While the engine gathers statistics on this very module it runs
    ``adapter.capture_forward(module, observe, *args, **kwargs)``; otherwise (eval, no grad,
    non-curvature steps, paused capture) the original forward runs untouched, as it does on a
    deep copy (EMA/SWA) or an unpickled copy of the module: the copied override still points at
    the original records (``LayerRecord`` deep-copies to itself), whose module is not the copy,
    and an unpickled engine is never active. ``uninstall()`` restores the previous forward.
    """

    def __init__(
        self,
        engine: CaptureEngine,
        records: list[LayerRecord],
        children: dict[str, LayerRecord] | None = None,
    ) -> None:
        self.engine = engine
        self.module = records[0].module
        self.adapter = records[0].adapter
        dtype = statistics_dtype(self.module)
        #: what ``observe`` accepts: the module's blocks, then its direct submodules' layers
        self.blocks = {
            name: (record, statistics_dtype(record.module))
            for name, record in (children or {}).items()
        }
        self.blocks.update({record.block: (record, dtype) for record in records})
        self._records = records
        #: an instance-level forward that was there before (None: the class's forward)
        self.previous = self.module.__dict__.get("forward")
        self.installed = False

    @classmethod
    def install(
        cls,
        engine: CaptureEngine,
        records: list[LayerRecord],
        children: dict[str, LayerRecord] | None = None,
    ) -> CapturingForward:
        forward = cls(engine, records, children)
        forward.module.forward = forward  # an instance attribute: shadows the class's forward
        forward.installed = True
        return forward

    def uninstall(self) -> None:
        """Put the previous forward back (idempotent); if something else replaced this override
        in the meantime, leave it there and only turn this one into a pass-through."""
        if not self.installed:
            return
        self.installed = False
        if self.module.__dict__.get("forward") is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous

    def original(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if self.installed and module is self.hooked and self.engine.capturing(module):
            return self.adapter.capture_forward(module, self.observe, *args, **kwargs)
        return self.original(*args, **kwargs)

    @property
    def hooked(self) -> nn.Module:
        """The module the records belong to (on a deep copy: not this override's module)."""
        return self._records[0].module

    def observe(self, block: str, x: Tensor, output: Tensor) -> None:
        """Block ``block`` (or the layer of the direct submodule ``block``, e.g. a projection
        the module applies functionally) read ``x`` and produced ``output``: capture it."""
        entry = self.blocks.get(block)
        if entry is not None:  # blocks without a record (frozen) are not captured
            record, dtype = entry
            self.engine._forward_hook(record, dtype, record.module, (x,), output)
