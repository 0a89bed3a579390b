"""ASDL backend: Fisher statistics from ASDL's Fisher maker (PyPI ``asdfghjkl``, import ``asdl``).

ASDL computes curvature by running the model itself (``FisherMaker.forward_and_backward``), so
this backend *replays* the batch (docs/backends.md):

* while ``is_active()`` a forward pre-hook on the model stores each training forward's arguments
  and RNG state, and a tensor hook on the model output stores the output gradient of each
  backward that reaches it (forwards that get no gradient are ignored, as natively);
* :meth:`AsdlBackend.collect` (called first in ``step()``) replays every stored call through
  ``get_fisher_maker(model, FisherConfig(...)).forward_and_backward()``: same inputs, same RNG
  state (same dropout masks), buffers (BatchNorm running statistics) restored afterwards, the
  parameters' ``.grad`` left untouched. One extra forward and backward (``C`` backwards for
  ``fisher_type="exact"`` with C classes) per captured call.

``fisher_type`` → ASDL: ``"empirical"`` → ``fisher_emp`` with the loss replaced by the linear
surrogate ``Σ output · captured_grad`` (its output gradient *is* the user's loss gradient, so any
loss and reduction is reproduced); ``"exact"`` → ``fisher_exact`` and ``"mc"`` → ``fisher_mc``
(``loss_type`` cross-entropy or MSE, ``n_mc_samples``, ``seed``). ASDL forces a ``"sum"`` loss
reduction and divides every factor by ``data_size`` (here the batch size N); the exact/MC square
roots are per-sample (no 1/N), so curvlab's ``g`` is ASDL's times ``r`` (``r = 1/#loss terms``
for ``loss_reduction="mean"``).

Shapes: Linear, Conv2d and Embedding use ASDL's ``kron`` (``A``, ``B``, no bias column); the
normalisation layers (BatchNorm1d/2d, LayerNorm), for which ASDL has no Kronecker factors, use its
per-parameter ``diag``: ``S = diag_bias`` and ``H = diag_weight / diag_bias`` per feature, so that
``H·S`` is ASDL's weight diagonal exactly (a per-parameter diagonal Σ(x̂ s)², not the product of
means Σx̂²·Σs² that the Kronecker-factored native statistics use; equal when |x̂| is the same on
every row of a feature, e.g. one row). BatchNorm2d's ASDL diagonal is per *sample* (spatially
summed gradients), so its rows are samples there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import statistics_dtype
from curvlab.interfaces.adapter import Statistic
from curvlab.interfaces.backend import Backend
from curvlab.interfaces.estimator import FactorEstimator
from curvlab.layers import LayerRecord
from curvlab.plugins.backends import check_estimator, check_structure, find_model, layer_error
from curvlab.registry import register

FISHER_TYPES = {"empirical": "fisher_emp", "exact": "fisher_exact", "mc": "fisher_mc"}
LOSS_TYPES = ("cross_entropy", "mse")
STRUCTURES = ("diagonal", "full")
_FISHER_ATTR = "_curvlab_asdl_fisher"
_KRON_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)
_DIAG_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def _require_asdl() -> Any:
    try:
        import asdl
    except ImportError as err:  # pragma: no cover - asdl is a test dependency
        raise ImportError(
            "the asdl backend needs ASDL: pip install asdfghjkl==0.1a5 (import name asdl; "
            "PyPI's unrelated package 'asdl' is something else)"
        ) from err
    return asdl


def _paper_adapter_types() -> dict[type, type]:
    from curvlab.plugins.adapters.conv2d import Conv2dAdapter
    from curvlab.plugins.adapters.convolution import ConvolutionAdapter
    from curvlab.plugins.adapters.embedding import EmbeddingAdapter
    from curvlab.plugins.adapters.linear import LinearAdapter
    from curvlab.plugins.adapters.normalization import BatchNormAdapter, LayerNormAdapter
    from curvlab.plugins.adapters.official import OfficialLinearAdapter

    return {
        nn.Linear: (LinearAdapter, OfficialLinearAdapter),
        nn.Conv2d: (Conv2dAdapter, ConvolutionAdapter),
        nn.Embedding: (EmbeddingAdapter,),
        nn.BatchNorm1d: (BatchNormAdapter,),
        nn.BatchNorm2d: (BatchNormAdapter,),
        nn.LayerNorm: (LayerNormAdapter,),
    }


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ASDL cannot give this module's statistics (``None``: it can)."""
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
        return (
            f"ASDL's Kronecker factors cover nn.Conv2d only among convolutions (its operations "
            f"have no {type(module).__name__})"
        )
    if not isinstance(module, _KRON_TYPES + _DIAG_TYPES):
        return (
            "ASDL's Fisher covers Linear, Conv2d, Embedding (Kronecker factors) and "
            "BatchNorm1d/2d, LayerNorm (per-parameter diagonal) only"
        )
    if isinstance(module, nn.Conv2d):
        if module.dilation != (1, 1):
            return f"ASDL's im2col does not support dilation (got {module.dilation})"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"ASDL's im2col needs numeric padding, got padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return f"ASDL's im2col assumes zero padding, got padding_mode={module.padding_mode!r}"
    if isinstance(module, _DIAG_TYPES):
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is None or bias is None:
            return "ASDL recovers x̂ = (output − bias) / weight and needs both affine parameters"
        if not (weight.requires_grad and bias.requires_grad):
            return "ASDL's diagonal of a normalisation layer needs both weight and bias trainable"
    return None


@dataclass(eq=False)
class _Call:
    """One captured training forward: what is needed to replay it."""

    args: tuple
    kwargs: dict
    cpu_rng: Tensor
    cuda_rng: dict[int, Tensor]
    grads: list[Tensor] = field(default_factory=list)


def _surrogate_loss(output: Tensor, grad: Tensor, reduction: str = "sum") -> Tensor:
    """``Σ output · grad``: its gradient w.r.t. the output is the captured ``grad``. ASDL passes
    ``reduction="sum"`` to every loss; the surrogate already reproduces the user's reduction."""
    return (output * grad).sum()


@register("backends", "asdl")
class AsdlBackend(Backend):
    """Fisher statistics from ASDL (see the module docstring and docs/backends.md).

    Args:
        fisher_type: ``"empirical"`` (default), ``"exact"`` or ``"mc"``.
        loss_type: ``"cross_entropy"`` or ``"mse"`` (ASDL's ``loss_type``; exact and MC only).
        loss_reduction: ``"mean"`` or ``"sum"``, the reduction of the training loss (exact and
            MC: scales ASDL's per-sample square roots like a gradient of that loss).
        n_mc_samples: sampled labels per sample for ``"mc"``.
        seed: seed of the sampled labels for ``"mc"`` (``seed + k`` for the k-th replay);
            ``None`` draws from the replayed RNG stream.
    """

    name = "asdl"

    def __init__(
        self,
        fisher_type: str = "empirical",
        loss_type: str = "cross_entropy",
        loss_reduction: str = "mean",
        n_mc_samples: int = 1,
        seed: int | None = 0,
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"asdl backend: fisher_type must be one of {tuple(FISHER_TYPES)}, "
                f"got {fisher_type!r}"
            )
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"asdl backend: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"asdl backend: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        if int(n_mc_samples) < 1:
            raise ValueError(f"asdl backend: n_mc_samples must be >= 1, got {n_mc_samples}")
        self.fisher_type = fisher_type
        self.loss_type = loss_type
        self.loss_reduction = loss_reduction
        self.n_mc_samples = int(n_mc_samples)
        self.seed = None if seed is None else int(seed)
        self._records: list[LayerRecord] = []
        self._model: nn.Module | None = None
        self._estimator: FactorEstimator | None = None
        self._is_active: Callable[[], bool] = lambda: False
        self._handles: list = []
        self._calls: list[_Call] = []
        self._replaying = False
        self._replays = 0
        self._pending: _Call | None = None

    def __repr__(self) -> str:
        return f"AsdlBackend(fisher_type={self.fisher_type!r})"

    # -- attach / detach ---------------------------------------------------------------------------
    def attach(
        self,
        layers: Sequence[LayerRecord],
        estimator: FactorEstimator,
        is_active: Callable[[], bool],
        model: nn.Module | None = None,
    ) -> None:
        self.detach()
        check_estimator(self.name, estimator)
        check_structure(self.name, layers, STRUCTURES)
        adapters = _paper_adapter_types()
        for record in layers:
            module = record.module
            reason = unsupported_reason(module)
            if reason is not None:
                raise layer_error(self.name, record.name, module, reason)
            expected = next(v for k, v in adapters.items() if isinstance(module, k))
            if type(record.adapter) not in expected:
                raise layer_error(
                    self.name,
                    record.name,
                    module,
                    f"its adapter {type(record.adapter).__name__} defines its own statistics; this "
                    f"backend reproduces those of {' / '.join(t.__name__ for t in expected)}",
                )
        _require_asdl()
        self._model = find_model(is_active, model)
        if self._model is None:
            raise ValueError(
                "asdl backend: ASDL's Fisher maker runs the whole model; pass model= to attach() "
                "or attach through a CurvatureOptimizer"
            )
        self._records = list(layers)
        self._estimator = estimator
        self._is_active = is_active
        self._handles = [
            self._model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self._model.register_forward_hook(self._post_forward),
        ]
        for record in self._records:
            if isinstance(record.module, (nn.Embedding, nn.BatchNorm1d)):
                self._handles.append(record.module.register_forward_pre_hook(self._check_input))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()
        self._records = []
        self._pending = None

    # -- capture -----------------------------------------------------------------------------------
    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending = None
        if self._replaying or not (
            self._is_active() and model.training and torch.is_grad_enabled()
        ):
            return
        cuda = {}
        for t in list(args) + list(kwargs.values()) + list(model.parameters())[:1]:
            if isinstance(t, Tensor) and t.is_cuda:
                index = t.device.index or 0
                cuda.setdefault(index, torch.cuda.get_rng_state(index))
        detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        self._pending = _Call(
            tuple(detach(a) for a in args),
            {k: detach(v) for k, v in kwargs.items()},
            torch.get_rng_state(),
            cuda,
        )

    def _post_forward(self, model: nn.Module, args: tuple, output) -> None:  # noqa: ANN001
        call, self._pending = getattr(self, "_pending", None), None
        if call is None:
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                f"asdl backend: the model must return one tensor (the logits) for ASDL's Fisher "
                f"maker, got {type(output).__name__}"
            )
        if not output.requires_grad:
            return
        self._calls.append(call)
        output.register_hook(lambda grad: call.grads.append(grad.detach()))

    def _check_input(self, module: nn.Module, inputs: tuple) -> None:
        if self._replaying or not (
            self._is_active() and module.training and torch.is_grad_enabled()
        ):
            return
        x = inputs[0]
        name = next((r.name for r in self._records if r.module is module), "?")
        if isinstance(module, nn.Embedding) and x.dim() < 2:
            raise layer_error(
                self.name,
                name,
                module,
                f"ASDL's Embedding factors need (batch, tokens) indices, got a {x.dim()}-D input",
            )
        if isinstance(module, nn.BatchNorm1d) and x.dim() != 2:
            raise layer_error(
                self.name,
                name,
                module,
                f"ASDL's BatchNorm1d diagonal needs (batch, features) input, got {x.dim()}-D",
            )

    # -- replay ------------------------------------------------------------------------------------
    def collect(self) -> None:
        calls, self._calls = self._calls, []
        for call in calls:
            for grad in call.grads:
                self._replay(call, grad)

    def _replay(self, call: _Call, grad: Tensor) -> None:
        from asdl import FisherConfig, get_fisher_maker

        model = self._model
        seen: dict[int, list[tuple[Tensor, tuple]]] = {}

        def remember(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen.setdefault(id(module), []).append((inputs[0].detach(), tuple(output.shape)))

        shapes = [
            (r.module, "kron" if isinstance(r.module, _KRON_TYPES) else "diag")
            for r in self._records
        ]
        batch = grad.shape[0] if grad.dim() > 0 else 1
        seed = None
        if self.fisher_type == "mc" and self.seed is not None:
            seed = self.seed + self._replays
        config = FisherConfig(
            fisher_type=FISHER_TYPES[self.fisher_type],
            fisher_shapes=shapes,
            loss_type=None if self.fisher_type == "empirical" else self.loss_type,
            n_mc_samples=self.n_mc_samples,
            seed=seed,
            fisher_attr=_FISHER_ATTR,
            data_size=batch,
        )
        maker = get_fisher_maker(model, config)
        dummy = maker.setup_model_call(model, *call.args, **call.kwargs)
        if self.fisher_type == "empirical":
            maker.setup_loss_call(_surrogate_loss, dummy, grad)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        grads = {p: p.grad for p in model.parameters()}
        hooks = [r.module.register_forward_hook(remember) for r in self._records]
        self._replaying = True
        try:
            with torch.random.fork_rng(devices=list(call.cuda_rng)), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ASDL's skip notices, torch's non-full hook notice
                torch.set_rng_state(call.cpu_rng)
                for index, state in call.cuda_rng.items():
                    torch.cuda.set_rng_state(state, index)
                with torch.enable_grad():
                    maker.forward_and_backward()
                    logits = maker.model_output
        finally:
            self._replaying = False
            for h in hooks:
                h.remove()
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            for p, g in grads.items():
                p.grad = g
            # ASDL registers (and removes) old-style backward hooks; torch keeps the module
            # flagged, which would make a later full backward hook (BackPACK, user code) fail
            for module in model.modules():
                if module._is_full_backward_hook is False and not module._backward_hooks:
                    module._is_full_backward_hook = None
        self._replays += 1
        if self.fisher_type == "empirical":
            c = 1.0
        else:
            terms = (
                logits.numel() // logits.shape[-1]
                if self.loss_type == "cross_entropy"
                else logits.numel()
            )
            c = 1.0 / terms**2 if self.loss_reduction == "mean" else 1.0
        for record in self._records:
            fisher = getattr(record.module, _FISHER_ATTR, None)
            if fisher is None or id(record.module) not in seen:
                continue
            delattr(record.module, _FISHER_ATTR)
            x, out_shape = self._merge_calls(record, seen[id(record.module)])
            stats = self._convert(record, fisher, x, out_shape, batch, c)
            record.accumulate(*stats)

    # -- conversion ----------------------------------------------------------------------------
    def _merge_calls(self, record: LayerRecord, calls: list[tuple[Tensor, tuple]]) -> tuple:
        """One input for a module that ran several times in the forward (ASDL sums them all):
        the calls' rows stacked; convolutions must see the same shapes each time."""
        if len(calls) == 1:
            return calls[0]
        module = record.module
        xs = [x for x, _ in calls]
        if isinstance(module, nn.Linear):
            return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), calls[-1][1]
        if isinstance(module, nn.Embedding):
            return torch.cat([x.reshape(1, -1) for x in xs], dim=1), calls[-1][1]
        if isinstance(module, nn.LayerNorm):
            return torch.cat([x.reshape(-1, *module.normalized_shape) for x in xs]), calls[-1][1]
        if len({(x.shape[1:], s) for x, s in calls}) > 1:
            raise layer_error(
                self.name,
                record.name,
                module,
                "it ran several times in one forward with different input shapes, which ASDL's "
                "per-call scaling cannot be undone for",
            )
        return torch.cat(xs), calls[-1][1]

    def _scale(self, record: LayerRecord, batch: int) -> float:
        if record.structure == "diagonal" or not getattr(self._estimator, "per_sample", False):
            return 1.0
        return float(batch)

    def _convert(
        self,
        record: LayerRecord,
        fisher,
        x: Tensor,
        out_shape: tuple,
        batch: int,
        c: float,  # noqa: ANN001
    ) -> tuple[Statistic, Statistic]:
        """ASDL's factors (divided by ``data_size = batch``) → curvlab's sums over rows."""
        module = record.module
        dtype = statistics_dtype(module)
        n = float(batch)
        if isinstance(module, _DIAG_TYPES):
            d_w = fisher.diag.weight.to(dtype) * n
            d_b = fisher.diag.bias.to(dtype) * n
            if isinstance(module, nn.BatchNorm2d):
                rows = x.shape[0]  # ASDL sums the gradient over positions per sample
            else:
                rows = x.numel() // module.weight.numel()
            H_mean = torch.where(d_b > 0, d_w / torch.where(d_b > 0, d_b, 1.0), 0.0)
            return Statistic(H_mean * rows, rows), Statistic(d_b * c, rows)
        A, B = fisher.kron.A.to(dtype), fisher.kron.B.to(dtype)
        scale = self._scale(record, batch)
        if isinstance(module, nn.Embedding):
            rows = x.numel()
            return (
                Statistic(torch.diagonal(A) * n, rows),
                Statistic(torch.diagonal(B) * (n * c), rows),
            )
        if isinstance(module, nn.Linear):
            rows = x.numel() // x.shape[-1]
            A_total = A * n
            groups = 1
            in_sum = x.reshape(rows, -1).to(dtype).sum(0)
        else:
            positions = out_shape[-1] * out_shape[-2]
            rows = x.shape[0] * positions
            A_total = A * (n * positions)
            groups = module.groups
            from curvlab.plugins.adapters.conv2d import Conv2dAdapter

            in_sum = None
            if record.structure == "full" and module.bias is not None:
                in_sum = Conv2dAdapter().input_rows(module, x.to(dtype))[..., :-1].sum(1)
        G_total = B * (n * c * scale**2)
        has_bias = module.bias is not None
        if record.structure == "diagonal":
            h = torch.diagonal(A_total).reshape(groups, -1)
            if has_bias:
                h = torch.cat([h, h.new_full((groups, 1), rows)], dim=1)
            h = h[0] if isinstance(module, nn.Linear) else h
            return Statistic(h, rows), Statistic(torch.diagonal(G_total).clone(), rows)
        d = A_total.shape[0] // groups
        o = G_total.shape[0] // groups
        blocks_A = torch.stack(
            [A_total[k * d : (k + 1) * d, k * d : (k + 1) * d] for k in range(groups)]
        )
        blocks_G = torch.stack(
            [G_total[k * o : (k + 1) * o, k * o : (k + 1) * o] for k in range(groups)]
        )
        if has_bias:
            col = in_sum.reshape(groups, d)
            full = blocks_A.new_zeros(groups, d + 1, d + 1)
            full[:, :d, :d] = blocks_A
            full[:, :d, d] = col
            full[:, d, :d] = col
            full[:, d, d] = rows
            blocks_A = full
        return Statistic(blocks_A, rows), Statistic(blocks_G, rows)

    # -- reporting --------------------------------------------------------------------------------
    def convention(self, record: LayerRecord) -> str:
        module = record.module
        red = "g=surrogate(captured grad)" if self.fisher_type == "empirical" else "S·r², r=1/terms"
        if isinstance(module, nn.Linear):
            return f"{FISHER_TYPES[self.fisher_type]} kron: H=diag(A)·N/R+1, S=diag(B)·N/R; {red}"
        if isinstance(module, nn.Conv2d):
            return f"{FISHER_TYPES[self.fisher_type]} kron: A/L·N, H=diag(A)+1, S=diag(B)/L; {red}"
        if isinstance(module, nn.Embedding):
            return f"{FISHER_TYPES[self.fisher_type]} kron: A=per-sample counts², S=diag(B)·N/R"
        return f"{FISHER_TYPES[self.fisher_type]} diag (per-parameter): S=d_b, H=d_w/d_b"
