"""Normalisation layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm, RMS-type), paper Prop. 3.3.1.

``y_c = γ_c x̂_c + β_c``: each feature c is a one-input "linear layer" with ā = [x̂_c, 1] and
g = s_c = ∂L/∂y_c, so per feature ``H_c = mean x̂_c²``, ``S_c = mean s_c²`` over the rows that
share the feature (the normalisation set), and ``F_γ = H'·S'``, ``F_β = S'`` (the bias' H is 1).
x̂ is recomputed from the layer input with the layer's own statistics (no affine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic, square_sum
from curvlab.registry import register


class ElementwiseAffineAdapter(LayerAdapter):
    """Shared part: statistics are per feature; subclasses say what x̂ and the feature dims are."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def feature_shape(self, module: nn.Module) -> torch.Size:
        """Shape of the per-feature statistics (the weight's)."""
        return module.weight.shape

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        """The dims that are summed over (everything that is not a feature dim)."""
        raise NotImplementedError

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        dims = self.reduce_dims(module, x)
        rows = _numel(x, dims)
        x_hat = self.normalized(module, x.to(dtype))
        return Statistic(square_sum(x_hat, dims, dtype).reshape(self.feature_shape(module)), rows)

    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        dims = self.reduce_dims(module, grad_output)
        total = square_sum(grad_output, dims, dtype).reshape(self.feature_shape(module))
        return Statistic(total, _numel(grad_output, dims))

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        out: dict[str, tuple[Tensor, Tensor | None]] = {"weight": (H, S)}
        if "bias" in self.parameters(module):
            out["bias"] = (S, None)
        return out


def _numel(x: Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


@register("adapters", "batchnorm")
class BatchNormAdapter(ElementwiseAffineAdapter):
    """BatchNorm1d/2d/3d in training mode: x̂ uses the batch statistics (biased variance), the
    normalisation set of channel c is (batch, spatial positions)."""

    module_types = (nn.modules.batchnorm._BatchNorm,)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return super().parameters(module) if module.affine else {}

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, training=True, eps=module.eps)

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return (0,) + tuple(range(2, x.dim()))

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        # x̂ = (x − μ)/√(σ² + ε) over exactly the rows that are averaged, so the mean of x̂² is
        # σ²/(σ² + ε) = 1 − ε·invstd² in closed form
        dims = self.reduce_dims(module, x)
        rows = _numel(x, dims)
        invstd = saved_batch_invstd(module, output)
        if invstd is not None:  # the forward pass computed it already: no pass over x at all
            H = 1.0 - module.eps * invstd.to(dtype).square()
            return Statistic((rows * H.clamp_min(0.0)).reshape(module.weight.shape), rows)
        # σ² = E[x²] − E[x]² from two fused reductions (torch.var is ~4× slower on NCHW)
        mean = x.to(dtype).sum(dims) / rows
        var = (square_sum(x, dims, dtype) / rows - mean * mean).clamp_min(0.0)
        return Statistic((rows * var / (var + module.eps)).reshape(module.weight.shape), rows)


#: read BatchNorm's saved batch statistics when available (tests switch it off to compare the
#: eager path with the recomputation a compiled model uses)
READ_SAVED_BATCH_STATS = True


def saved_batch_invstd(module: nn.Module, output: Tensor) -> Tensor | None:
    """1/√(σ²_batch + ε) per channel as the training-mode BatchNorm forward saved it for its
    backward (ATen's native kernel: ``NativeBatchNormBackward0``), or None when the output's
    autograd node is another one (cuDNN, a compiled model, no grad): the caller recomputes."""
    node = output.grad_fn
    if (
        not READ_SAVED_BATCH_STATS
        or node is None
        or type(node).__name__ != "NativeBatchNormBackward0"
    ):
        return None
    try:
        if not node._saved_training or node._saved_eps != module.eps:
            return None
        invstd = node._saved_result2
    except (AttributeError, RuntimeError):  # renamed fields, or freed saved tensors
        return None
    if not isinstance(invstd, Tensor) or invstd.shape != (module.num_features,):
        return None
    return invstd


@register("adapters", "layernorm")
class LayerNormAdapter(ElementwiseAffineAdapter):
    """LayerNorm over ``normalized_shape``: features are the normalised dims, rows all others."""

    module_types = (nn.LayerNorm,)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return tuple(range(x.dim() - len(module.normalized_shape)))


@register("adapters", "rmsnorm")
class RMSNormAdapter(ElementwiseAffineAdapter):
    r"""RMS-type normalisation ``y = w ⊙ x̂ [+ b]``, ``x̂ = x / sqrt(mean_D x² + ε)`` over the
    normalised dims D (``normalized_shape``, else the weight's shape: the trailing dims).

    Per feature c: ``H_c = mean x̂_c²``, ``S_c = mean s_c²`` over all other dims (paper
    Prop. 3.3.1 with ā = x̂_c), ``F_w = H'·S'``, ``F_b = S'``. Matches ``nn.RMSNorm``; other
    classes that compute the same thing (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ...)
    are mapped onto it with :func:`curvlab.register_layer`, whose options say how to read the
    module:

    * ``eps``: the attribute that holds ε (``"eps"``; HF: ``"variance_epsilon"``), or a number.
      ``None`` stored there means torch's default, ``finfo(input dtype).eps``.
    * ``weight`` / ``bias``: attribute names of the scale (``"weight"``) and of an optional
      shift (``None``: no bias).

    x̂ is recomputed in the statistics dtype (fp32 or fp64), as HF's classes compute it in fp32
    before casting back. Parameterisations such as Gemma's ``y = (1 + w) ⊙ x̂`` need no option:
    ``∂y/∂w = x̂`` either way, so the Fisher of w is the same.
    """

    module_types = (nn.RMSNorm,)

    def __init__(
        self, eps: str | float = "eps", weight: str = "weight", bias: str | None = None
    ) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (str, int, float)):
            raise TypeError(
                f"rmsnorm option eps must be an attribute name or a number, got {eps!r}"
            )
        if not isinstance(eps, str) and not eps >= 0:
            raise ValueError(f"rmsnorm option eps must be >= 0, got {eps!r}")
        for key, value in (("weight", weight), ("bias", bias)):
            if not (isinstance(value, str) and value.isidentifier()) and not (
                key == "bias" and value is None
            ):
                raise TypeError(f"rmsnorm option {key} must be an attribute name, got {value!r}")
        self.eps = eps
        self.weight = weight
        self.bias = bias

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        out = {}
        for role, attribute in (("weight", self.weight), ("bias", self.bias)):
            if attribute is None:
                continue
            if not hasattr(module, attribute):
                raise ValueError(
                    f"rmsnorm adapter: {type(module).__name__} has no attribute {attribute!r} "
                    f"(option {role}={attribute!r})"
                )
            p = getattr(module, attribute)
            if isinstance(p, nn.Parameter):
                out[role] = p
        if out:
            self.epsilon(module, torch.float32)  # fail at pairing, not in a hook
        return out

    def epsilon(self, module: nn.Module, input_dtype: torch.dtype) -> float:
        if not isinstance(self.eps, str):
            return float(self.eps)
        if not hasattr(module, self.eps):
            raise ValueError(
                f"rmsnorm adapter: {type(module).__name__} has no attribute {self.eps!r} "
                f"(option eps={self.eps!r}; give the attribute that holds ε, or a number)"
            )
        value = getattr(module, self.eps)
        return torch.finfo(input_dtype).eps if value is None else float(value)

    def feature_shape(self, module: nn.Module) -> torch.Size:
        return getattr(module, self.weight).shape

    def _normalized_shape(self, module: nn.Module) -> tuple[int, ...]:
        shape = getattr(module, "normalized_shape", None)
        return tuple(shape) if shape is not None else tuple(self.feature_shape(module))

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return tuple(range(x.dim() - len(self._normalized_shape(module))))

    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        dims = self.reduce_dims(module, x)
        eps = self.epsilon(module, x.dtype)  # torch's default ε follows the input's dtype
        x_hat = F.rms_norm(x.to(dtype), self._normalized_shape(module), None, eps)
        total = square_sum(x_hat, dims, dtype).reshape(self.feature_shape(module))
        return Statistic(total, _numel(x, dims))

    def __repr__(self) -> str:
        return f"RMSNormAdapter(eps={self.eps!r}, weight={self.weight!r}, bias={self.bias!r})"


@register("adapters", "groupnorm")
class GroupNormAdapter(ElementwiseAffineAdapter):
    """GroupNorm: x̂ normalised per (sample, group); channel c's rows are (batch, spatial)."""

    module_types = (nn.GroupNorm,)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return (0,) + tuple(range(2, x.dim()))
