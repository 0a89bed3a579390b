"""BackPACK backend: Kronecker statistics from BackPACK extensions during the user's backward.

How it plugs into ``opt.zero_grad(); loss.backward(); opt.step()`` (docs/backends.md):

* ``attach`` *extends* the optimizer's Linear and convolution layers (Conv1d/2d/3d,
  ConvTranspose1d/2d/3d) with BackPACK (its forward hook
  stores each layer's input, its full backward hook runs the active extensions); with
  ``fisher_type="exact"`` or ``"mc"`` the whole model is extended, because BackPACK's
  second-order extensions backpropagate a loss-Hessian square root through every module, and the
  loss must then be an extended loss module (:meth:`BackpackBackend.loss_module`).
* A forward pre-hook on each layer *enters* the ``backpack(...)`` context the first time a layer
  runs on a curvature step (``is_active()``, training mode, grad enabled); the context stays
  active through the user's backward (or several, for gradient accumulation) and is left in
  :meth:`collect`, which ``step()`` calls first. Off curvature steps BackPACK computes nothing.
* During the backward, BackPACK's results are read per layer, converted to curvlab's conventions
  and summed into the layer's record with their row counts, so several backward passes average.

Statistics per ``fisher_type`` (all converted to curvlab's raw sums, SPEC §3):

* ``"empirical"`` (AdaFisher's Fisher; BackPACK has no empirical K-FAC): ``g`` rows of a Linear
  layer with a bias on 2-D input are BackPACK's per-sample bias gradients (``BatchGrad``, which
  for a mean-reduced loss carry the 1/N, exactly like curvlab's ``g``); for convolutions
  (BatchGrad's bias gradient sums over positions) and other Linear inputs ``g`` is the output
  gradient that BackPACK's backward hook hands to its module extensions. ``ā`` rows are the
  layer input that BackPACK stored, unfolded with BackPACK's own ``unfold_input`` (convolutions)
  or ``unfold_by_conv_transpose`` (transposed convolutions).
* ``"exact"`` (KFLR) / ``"mc"`` (KFAC, ``mc_samples`` labels per sample, seeded): ``H`` is the
  diagonal of BackPACK's ``A`` (a mean over samples, summed over positions), ``S`` the diagonal of
  its ``G`` (a sum over samples of the backpropagated square root, which carries ``1/√N`` for a
  mean-reduced loss) times the loss's reduction factor, i.e. curvlab's ``g`` is the square-root
  column scaled like a gradient of the loss. For every convolution the ``G`` module extension is
  replaced by the per-position ("expand") sum Σₙ,ₜ g gᵀ — BackPACK's own conv ``G`` squares the
  spatial sum (the bias GGN) and is not comparable with curvlab's rows. For a transposed
  convolution BackPACK's ``A`` is the factor of ``weight.transpose(0, 1)``, indexed (C_in, k…)
  like curvlab's H.

``factor order``: BackPACK returns ``[G, A]`` for a weight and ``[G]`` for a bias, without a ones
column; the bias entry of ``H`` (and the bias row/column of a full ``A``) is added here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
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

FISHER_TYPES = ("empirical", "exact", "mc")
#: BackPACK's extension for each non-empirical Fisher type
EXTENSION_NAMES = {"exact": "KFLR", "mc": "KFAC"}
#: structures this backend produces
STRUCTURES = ("diagonal", "full")
#: BackPACK warns on every transposed-convolution factor that it is that of weight.transpose(0, 1)
#: (its layout (C_in, k…) × C_out is exactly curvlab's H and S for that layer)
_TRANSPOSE_WEIGHT_WARNING = r"The Kronecker factors stored in the weight parameters of transpose"
_FULL_HOOK_WARNING = (
    r"Full backward hook is firing when gradients are computed with respect to module outputs"
)


def _require_backpack() -> Any:
    try:
        import backpack
    except ImportError as err:  # pragma: no cover - backpack is a test dependency
        raise ImportError(
            "the backpack backend needs BackPACK: pip install backpack-for-pytorch==1.7.1"
        ) from err
    return backpack


def _paper_adapter_types() -> tuple[type, ...]:
    from curvlab.plugins.adapters.conv2d import Conv2dAdapter
    from curvlab.plugins.adapters.conv_transpose import ConvTransposeAdapter
    from curvlab.plugins.adapters.convolution import ConvolutionAdapter
    from curvlab.plugins.adapters.linear import LinearAdapter
    from curvlab.plugins.adapters.official import OfficialLinearAdapter

    return (
        LinearAdapter,
        OfficialLinearAdapter,
        Conv2dAdapter,
        ConvolutionAdapter,
        ConvTransposeAdapter,
    )


#: the convolutions whose Kronecker factors BackPACK computes (exact classes)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SUPPORTED_TYPES = (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES)


def _batched(module: nn.Module, x: Tensor) -> Tensor:
    return x if x.dim() == len(module.kernel_size) + 2 else x[None]


def unsupported_reason(module: nn.Module, fisher_type: str) -> str | None:
    """Why BackPACK cannot give this module's Kronecker statistics (``None``: it can)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            "BackPACK handles BatchNorm only in eval mode (batch statistics couple the samples) "
            "and has no Kronecker factors for it"
        )
    if isinstance(module, nn.LayerNorm):
        return "BackPACK does not support LayerNorm"
    if isinstance(module, nn.Embedding):
        return "BackPACK has no Kronecker factors (KFAC/KFLR) for Embedding"
    if type(module) not in SUPPORTED_TYPES:
        return (
            f"BackPACK's Kronecker factors cover exactly nn.Linear and nn.Conv2d and their "
            f"siblings nn.Conv1d/3d, nn.ConvTranspose1d/2d/3d (matched by class, so subclasses "
            f"such as {type(module).__name__} are not extended)"
        )
    if _is_conv(module):
        if isinstance(module.padding, str):
            return f"BackPACK's unfold needs numeric padding, got padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return f"BackPACK assumes zero padding, got padding_mode={module.padding_mode!r}"
        if fisher_type != "empirical" and module.groups != 1:
            return (
                f"BackPACK's {EXTENSION_NAMES[fisher_type]} does not support grouped convolutions"
            )
    if isinstance(module, CONV_TRANSPOSE_TYPES) and any(module.output_padding):
        # unfold_by_conv_transpose passes output_padding=0 (a TODO there): it leaves out the
        # output positions that output_padding adds
        return (
            f"BackPACK's transpose-convolution unfold ignores output_padding "
            f"(got {module.output_padding})"
        )
    return None


# -- statistics from rows / from BackPACK's factors ---------------------------------------------
def _with_bias_column(rows: Tensor, has_bias: bool) -> Tensor:
    if not has_bias:
        return rows
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


def _input_rows(module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """ā rows as (groups, R, d[+1]) from the input BackPACK stored."""
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        return _with_bias_column(rows, has_bias)[None]
    x = _batched(module, x)
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        from backpack.utils.conv_transpose import unfold_by_conv_transpose

        patches = unfold_by_conv_transpose(x, module)
    else:
        from backpack.utils.conv import unfold_input

        patches = unfold_input(module, x)
    patches = patches.to(dtype)  # (N, C_in·Πk, L), channel-major
    n, d, L = patches.shape
    groups = module.groups
    rows = patches.reshape(n, groups, d // groups, L).permute(1, 0, 3, 2).reshape(groups, n * L, -1)
    return _with_bias_column(rows, has_bias)


def _input_statistic(structure: str, module: nn.Module, rows: Tensor) -> Statistic:
    count = rows.shape[1]
    if structure == "diagonal":
        total = (rows * rows).sum(1)
        return Statistic(total[0] if isinstance(module, nn.Linear) else total, count)
    return Statistic(rows.transpose(1, 2) @ rows, count)


def _output_statistic(structure: str, module: nn.Module, g: Tensor, scale: float) -> Statistic:
    """``g`` as (R, out) rows (already in the statistics dtype)."""
    count = g.shape[0]
    if structure == "diagonal":
        return Statistic((g * g).sum(0) * scale**2, count)
    groups = getattr(module, "groups", 1)
    rows = g.reshape(count, groups, -1).transpose(0, 1)
    if scale != 1.0:
        rows = rows * scale
    return Statistic(rows.transpose(1, 2) @ rows, count)


def _input_from_kron(
    structure: str, module: nn.Module, A_total: Tensor, x: Tensor, rows: int, dtype: torch.dtype
) -> Statistic:
    """curvlab's input statistic from BackPACK's ``A`` (already multiplied back to a sum over
    rows, without the bias); the bias part Σ ā (full) or R (diagonal) is added."""
    has_bias = module.bias is not None
    A_total = A_total.to(dtype)
    if structure == "diagonal":
        total = torch.diagonal(A_total)
        if has_bias:
            total = torch.cat([total, total.new_full((1,), rows)])
        return Statistic(total if isinstance(module, nn.Linear) else total[None], rows)
    if has_bias:
        in_rows = _input_rows(module, x, dtype)[0]  # groups == 1 for KFLR/KFAC
        col = in_rows[:, :-1].sum(0)
        d = A_total.shape[0]
        full = A_total.new_zeros(d + 1, d + 1)
        full[:d, :d] = A_total
        full[:d, d] = col
        full[d, :d] = col
        full[d, d] = rows
        A_total = full
    return Statistic(A_total[None], rows)


def _output_from_kron(structure: str, G_total: Tensor, rows: int, dtype: torch.dtype) -> Statistic:
    G_total = G_total.to(dtype)
    if structure == "diagonal":
        return Statistic(torch.diagonal(G_total).clone(), rows)
    return Statistic(G_total[None], rows)


# -- BackPACK extensions ------------------------------------------------------------------------
def _make_extensions(backend: BackpackBackend) -> tuple:
    """The BackPACK extensions of ``backend.fisher_type`` (BackPACK imported here, lazily)."""
    _require_backpack()
    from backpack.extensions import KFAC, KFLR
    from backpack.extensions.backprop_extension import FAIL_SILENT
    from backpack.extensions.firstorder.base import FirstOrderBackpropExtension
    from backpack.extensions.module_extension import ModuleExtension
    from backpack.extensions.secondorder.hbp.conv_transposend import HBPConvTransposeNd
    from backpack.extensions.secondorder.hbp.convnd import HBPConvNd
    from backpack.utils.module_classification import is_loss

    if backend.fisher_type == "empirical":
        from backpack.core.derivatives.linear import LinearDerivatives
        from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase

        class BiasBatchGrad(FirstOrderBackpropExtension):
            """BackPACK's BatchGrad restricted to the bias of Linear layers (per-sample bias
            gradients = per-sample output gradients on 2-D input); the per-sample weight
            gradients that BatchGrad would also compute are not needed."""

            def __init__(self) -> None:
                super().__init__(
                    savefield="grad_batch",
                    module_exts={nn.Linear: BatchGradBase(LinearDerivatives(), params=["bias"])},
                    fail_mode=FAIL_SILENT,
                )

        class OutputGradient(ModuleExtension):
            """Hands the output gradient that BackPACK's backward hook received to the backend."""

            def __call__(self, extension, module, g_inp, g_out) -> None:  # noqa: ANN001
                backend._on_backward(module, g_out[0])

        class CurvlabEmpirical(FirstOrderBackpropExtension):
            def __init__(self) -> None:
                super().__init__(
                    savefield="curvlab_empirical",
                    module_exts={t: OutputGradient() for t in SUPPORTED_TYPES},
                    fail_mode=FAIL_SILENT,
                )

        return (BiasBatchGrad(), CurvlabEmpirical())

    def _expand_factor(self, module, backproped):  # noqa: ANN001, ANN202
        """``G = Σ_{v,n,t} s sᵀ`` over output positions (curvlab's rows, "expand") instead of
        BackPACK's square of the spatial sum."""
        s = backproped.flatten(start_dim=3)  # (V, N, C_out, L)
        return torch.einsum("vnil,vnjl->ij", s, s)

    expand = {
        t: type(f"Expand{base.__name__}", (base,), {"_factor_from_sqrt": _expand_factor})(rank)
        for types, base in ((CONV_TYPES, HBPConvNd), (CONV_TRANSPOSE_TYPES, HBPConvTransposeNd))
        for rank, t in enumerate(types, start=1)
    }

    base = KFLR if backend.fisher_type == "exact" else KFAC

    class Seeded(base):  # type: ignore[misc, valid-type]
        """Records the loss reduction; with ``fisher_type="mc"`` draws the labels from
        ``seed + k`` (k = backward passes so far) inside a forked RNG, so the user's random
        stream is untouched."""

        def __call__(self, module, g_inp, g_out) -> None:  # noqa: ANN001
            if not is_loss(module):
                if backend._reduction_factor is None and id(module) in backend._records:
                    raise RuntimeError(
                        f"backpack backend (fisher_type={backend.fisher_type!r}): "
                        f"{EXTENSION_NAMES[backend.fisher_type]} needs the loss as an extended "
                        f"BackPACK module, where it starts the loss-Hessian square root: compute "
                        f"the loss with loss_fn = opt.backend.loss_module(nn.CrossEntropyLoss())"
                    )
                return super().__call__(module, g_inp, g_out)
            x = module.input0
            per_term = x.numel() // x.shape[1] if x.dim() > 1 else 1
            reduction = getattr(module, "reduction", "mean")
            backend._reduction_factor = 1.0 / per_term if reduction == "mean" else 1.0
            if backend.fisher_type != "mc" or backend.seed is None:
                return super().__call__(module, g_inp, g_out)
            devices = [x.device.index or 0] if x.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(backend.seed + backend._mc_calls)
                backend._mc_calls += 1
                return super().__call__(module, g_inp, g_out)

    ext = Seeded() if base is KFLR else Seeded(mc_samples=backend.mc_samples)
    for module_type, extension in expand.items():
        ext.set_module_extension(module_type, extension, overwrite=True)
    return (ext,)


@register("backends", "backpack")
class BackpackBackend(Backend):
    """Kronecker statistics from BackPACK (see the module docstring and docs/backends.md).

    Args:
        fisher_type: ``"empirical"`` (default; AdaFisher's Fisher, rebuilt from ``BatchGrad`` and
            the stored inputs), ``"exact"`` (``KFLR``) or ``"mc"`` (``KFAC``).
        mc_samples: sampled labels per sample for ``"mc"``.
        seed: seed of the sampled labels for ``"mc"`` (``None``: the global RNG).
    """

    name = "backpack"

    def __init__(
        self, fisher_type: str = "empirical", mc_samples: int = 1, seed: int | None = 0
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"backpack backend: fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}"
            )
        if int(mc_samples) < 1:
            raise ValueError(f"backpack backend: mc_samples must be >= 1, got {mc_samples}")
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)
        self.seed = None if seed is None else int(seed)
        self._records: dict[int, LayerRecord] = {}
        self._deferred: dict[int, tuple[LayerRecord, str]] = {}
        self._handles: list = []
        self._backpack_handles: list = []
        self._extended: list[nn.Module] = []
        self._context = None
        self._context_active = False
        self._armed: dict[int, bool] = {}
        self._forwards: dict[int, int] = {}
        self._estimator: FactorEstimator | None = None
        self._is_active: Callable[[], bool] = lambda: False
        self._model: nn.Module | None = None
        self._reduction_factor: float | None = None
        self._mc_calls = 0

    def __repr__(self) -> str:
        return f"BackpackBackend(fisher_type={self.fisher_type!r})"

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
        paper_adapters = _paper_adapter_types()
        for record in layers:
            module = record.module
            reason = unsupported_reason(module, self.fisher_type)
            if reason is not None:
                deferrable = (
                    isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
                )
                if not deferrable:
                    raise layer_error(self.name, record.name, module, reason)
                # an eval-mode BatchNorm is never captured; checked whenever it runs in train mode
                self._deferred[id(module)] = (record, reason)
                continue
            if type(record.adapter) not in paper_adapters:
                raise layer_error(
                    self.name,
                    record.name,
                    module,
                    f"its adapter {type(record.adapter).__name__} defines its own statistics; this "
                    f"backend reproduces those of LinearAdapter / ConvolutionAdapter / "
                    f"ConvTransposeAdapter",
                )
        backpack = _require_backpack()
        from backpack.context import CTX

        self._estimator = estimator
        self._is_active = is_active
        self._records = {id(r.module): r for r in layers if id(r.module) not in self._deferred}
        if self.fisher_type != "empirical":
            self._model = find_model(is_active, model)
            if self._model is None:
                raise ValueError(
                    f"backpack backend: fisher_type={self.fisher_type!r} extends the whole model "
                    f"(BackPACK backpropagates the loss-Hessian square root through every module); "
                    f"pass model= to attach() or attach through a CurvatureOptimizer"
                )
            targets = [self._model]
            for name, module in self._model.named_modules():
                if (
                    not isinstance(module, nn.modules.batchnorm._BatchNorm)
                    or id(module) in self._deferred
                ):
                    continue
                if id(module) in self._records:
                    continue
                reason = (
                    f"BackPACK's {EXTENSION_NAMES[self.fisher_type]} backpropagates through every "
                    f"module of the model and handles BatchNorm only in eval mode"
                )
                if module.training:
                    raise layer_error(self.name, name or "<root>", module, reason)
                self._deferred[id(module)] = (
                    LayerRecord(name, module, None, {}),  # type: ignore[arg-type]
                    reason,
                )
        else:
            targets = [r.module for r in self._records.values()]
        before = len(CTX.hook_handles)
        fresh = [
            m for t in targets for m in t.modules() if not getattr(m, "_backpack_extend", False)
        ]
        for target in targets:
            backpack.extend(target)
        self._backpack_handles = CTX.hook_handles[before:]
        self._extended = [m for m in fresh if getattr(m, "_backpack_extend", False)]
        # BackPACK's full backward hook on the first layer (whose input needs no gradient) makes
        # torch warn on every backward; the hook still runs correctly.
        warnings.filterwarnings("ignore", message=_FULL_HOOK_WARNING, category=UserWarning)
        warnings.filterwarnings("ignore", message=_TRANSPOSE_WEIGHT_WARNING, category=UserWarning)
        for record in list(self._records.values()) + [r for r, _ in self._deferred.values()]:
            self._handles.append(record.module.register_forward_pre_hook(self._pre_forward))
        self._context = backpack.backpack(
            *_make_extensions(self), extension_hook=self._extension_hook
        )

    def loss_module(self, loss: nn.Module) -> nn.Module:
        """Extend a loss module for ``fisher_type="exact"``/``"mc"`` (BackPACK starts the
        loss-Hessian square root there):
        ``loss_fn = opt.backend.loss_module(nn.CrossEntropyLoss())``."""
        backpack = _require_backpack()
        from backpack.context import CTX

        if not getattr(loss, "_backpack_extend", False):
            before = len(CTX.hook_handles)
            backpack.extend(loss)
            self._backpack_handles += CTX.hook_handles[before:]
            self._extended.append(loss)
        return loss

    def detach(self) -> None:
        self._exit_context()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._backpack_handles:
            from backpack.context import CTX

            mine = {id(h) for h in self._backpack_handles}
            for handle in self._backpack_handles:
                handle.remove()
            CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in mine]
            self._backpack_handles = []
        for module in self._extended:
            # torch keeps flagging a module as using full backward hooks after their removal,
            # which would make a later register_backward_hook (ASDL) fail on it
            if not module._backward_hooks and getattr(module, "_is_full_backward_hook", None):
                module._is_full_backward_hook = None
            for attr in ("_backpack_extend", "output"):
                if hasattr(module, attr):
                    delattr(module, attr)
            i = 0
            while hasattr(module, f"input{i}"):
                delattr(module, f"input{i}")
                i += 1
        self._extended = []
        self._records.clear()
        self._deferred.clear()
        self._armed.clear()
        self._forwards.clear()
        self._context = None

    # -- the capture -------------------------------------------------------------------------------
    def _enter_context(self) -> None:
        if not self._context_active and self._context is not None:
            self._context.__enter__()
            self._context_active = True

    def _exit_context(self) -> None:
        if self._context_active:
            self._context.__exit__(None, None, None)
            self._context_active = False

    def _pre_forward(self, module: nn.Module, inputs: tuple) -> None:
        armed = bool(self._is_active() and module.training and torch.is_grad_enabled())
        deferred = self._deferred.get(id(module))
        if deferred is not None:
            if armed:
                record, reason = deferred
                raise layer_error(
                    self.name, record.name, module, reason + " (it runs in train mode)"
                )
            return
        if armed and inputs and isinstance(module, nn.Linear) and self.fisher_type != "empirical":
            if inputs[0].dim() != 2:
                raise layer_error(
                    self.name,
                    self._records[id(module)].name,
                    module,
                    f"BackPACK's {EXTENSION_NAMES[self.fisher_type]} supports Linear layers on 2-D "
                    f"input only (got {inputs[0].dim()}-D)",
                )
        if armed:
            if self._forwards.get(id(module), 0) > 0:
                raise layer_error(
                    self.name,
                    self._records[id(module)].name,
                    module,
                    "it ran twice before a backward pass (BackPACK stores one input per module: "
                    "reused modules and several forwards per backward are not supported)",
                )
            self._forwards[id(module)] = 1
            self._enter_context()
        self._armed[id(module)] = armed

    def _taking(self, module: nn.Module) -> LayerRecord | None:
        record = self._records.get(id(module))
        if record is None or not self._armed.get(id(module), False):
            return None
        self._forwards[id(module)] = 0
        return record

    def _scale(self, record: LayerRecord, grad_output: Tensor | None, batch: int) -> float:
        """The full estimator's per-sample scaling (N·g), mirrored; 1 for the diagonal."""
        if record.structure == "diagonal" or not getattr(self._estimator, "per_sample", False):
            return 1.0
        if grad_output is not None:
            return float(record.adapter.batch_size(record.module, grad_output))
        return float(batch)

    def _on_backward(self, module: nn.Module, grad_output: Tensor) -> None:
        """Empirical Fisher: called by the BackPACK module extension with the output gradient."""
        record = self._taking(module)
        if record is None:
            self._drop_batch_grad(module)
            return
        dtype = statistics_dtype(module)
        x = module.input0
        in_rows = _input_rows(module, x, dtype)
        bias = module.bias
        grad_batch = getattr(bias, "grad_batch", None) if bias is not None else None
        if isinstance(module, nn.Linear) and x.dim() == 2 and grad_batch is not None:
            g = grad_batch.to(dtype)  # BatchGrad: per-sample bias gradient = output gradient row
        elif isinstance(module, nn.Linear):
            g = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)
        else:
            go = _batched(module, grad_output)
            g = go.movedim(1, -1).reshape(-1, go.shape[1]).to(dtype)
        self._drop_batch_grad(module)
        scale = self._scale(record, grad_output, g.shape[0])
        record.accumulate(
            _input_statistic(record.structure, module, in_rows),
            _output_statistic(record.structure, module, g, scale),
        )

    @staticmethod
    def _drop_batch_grad(module: nn.Module) -> None:
        bias = getattr(module, "bias", None)
        if bias is not None and hasattr(bias, "grad_batch"):
            del bias.grad_batch

    def _extension_hook(self, module: nn.Module) -> None:
        """Called by BackPACK after its extensions ran on ``module`` (KFLR / KFAC results)."""
        if self.fisher_type == "empirical":
            return
        savefield = EXTENSION_NAMES[self.fisher_type].lower()
        factors = {}
        for role in ("weight", "bias"):
            p = getattr(module, role, None)
            if isinstance(p, nn.Parameter) and hasattr(p, savefield):
                factors[role] = getattr(p, savefield)
                delattr(p, savefield)
        record = self._taking(module)
        if record is None or not factors:
            return
        dtype = statistics_dtype(module)
        x = module.input0
        n = x.shape[0] if (isinstance(module, nn.Linear) or _batched(module, x) is x) else 1
        out = module.output
        positions = 1 if isinstance(module, nn.Linear) else out.shape[2:].numel()
        rows = n * positions
        if "weight" in factors:
            G, A = factors["weight"][0], factors["weight"][1]
            input_stat = _input_from_kron(record.structure, module, A * n, x, rows, dtype)
        else:  # frozen weight: BackPACK gives G only; ā from the stored input
            G = factors["bias"][0]
            input_stat = _input_statistic(record.structure, module, _input_rows(module, x, dtype))
        scale = self._scale(record, None, n)
        G_total = G * (self._reduction_factor * scale**2)
        record.accumulate(input_stat, _output_from_kron(record.structure, G_total, rows, dtype))

    def collect(self) -> None:
        """Leave the BackPACK context (entered at the first captured forward of this step)."""
        self._exit_context()
        self._forwards.clear()
        self._reduction_factor = None

    # -- reporting --------------------------------------------------------------------------------
    def convention(self, record: LayerRecord) -> str:
        """How this backend's numbers were turned into curvlab's (for check-curvature)."""
        module = record.module
        if self.fisher_type == "empirical":
            if isinstance(module, nn.Linear):
                return "g=BatchGrad bias (2-D) else hook g_out; ā=stored input0; +1 bias"
            unfold = (
                "unfold_by_conv_transpose"
                if isinstance(module, CONV_TRANSPOSE_TYPES)
                else "unfold_input"
            )
            return f"g=g_out per position; ā=backpack {unfold}(input0); +1 bias"
        ext = EXTENSION_NAMES[self.fisher_type]
        if isinstance(module, nn.Linear):
            return f"{ext} [G,A]: H=diag(A)·N/R+1, S=diag(G)·r (r=1/N mean)"
        return f"{ext} [G,A], G expand: H=diag(A)/L+1, S=diag(G)·r"
