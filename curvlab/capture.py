"""Capture engine: forward hooks plus tensor hooks on layer outputs (as curvlinops does).

The forward hook computes the input statistic at once (so nothing extra is kept alive) and
registers a hook on the *output tensor*; that hook computes the output-gradient statistic and
commits the pair. Tensor hooks survive in-place ops on the output (they receive the gradient
w.r.t. the tensor before modification), unlike ``register_full_backward_hook``. A forward whose
output never receives a gradient commits nothing, so input and output statistics always pair.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial

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
        for record in layers:
            dtype = statistics_dtype(record.module)
            handle = record.module.register_forward_hook(partial(self._forward_hook, record, dtype))
            self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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
        if not (self._is_active() and module.training and torch.is_grad_enabled()):
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
        output.register_hook(partial(self._output_hook, record, dtype, input_stat))

    def _output_hook(
        self, record: LayerRecord, dtype: torch.dtype, input_stat, grad: Tensor
    ) -> None:
        with _no_autocast(grad.device.type):
            output_stat = self._estimator.output_statistic(
                record.adapter, record.module, grad.detach(), dtype
            )
        record.accumulate(input_stat, output_stat)
