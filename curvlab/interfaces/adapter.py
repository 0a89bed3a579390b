"""LayerAdapter: what the Kronecker statistics of one module type are."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from curvlab.scratch import scratch
from curvlab.sharding import original_class, rows_numel


class Statistic(NamedTuple):
    """A raw factor statistic as a *sum* over ``count`` rows (mean = total / count).

    Sums and counts (rather than means) make several backward passes per step and several
    data-parallel ranks average correctly: totals and counts are added, then divided once.
    """

    total: Tensor
    count: int


#: ``observe(block, x, output)``, handed to :meth:`LayerAdapter.capture_forward`: the Kronecker
#: block ``block`` of the module read its input rows from ``x`` and produced ``output`` (the
#: tensor whose gradient is the block's g)
Observe = Callable[[str, Tensor, Tensor], None]


class LayerAdapter(ABC):
    """Knows one module type: which parameters it owns and what its Kronecker rows are.

    For a layer ``z = W ā`` (``ā`` the input row with a trailing 1 when there is a bias, ``g`` the
    loss gradient w.r.t. ``z``), the diagonal factors are ``H = mean(ā²)`` and ``S = mean(g²)``
    over the rows (batch × positions), and the un-damped diagonal Fisher of ``[W, b]`` is
    ``S ⊗ H`` (SPEC §3). Parameters are paired with layers by identity: :meth:`parameters`
    returns the module's *own* tensors.

    Subclasses set :attr:`module_types` and implement the diagonal statistics; adapters that
    also serve the full/banded estimators implement :meth:`input_rows` / :meth:`output_rows`.

    Optional extension points (docs/plugins.md, "Layers with several Kronecker blocks"):

    * :meth:`blocks` describes one module as several Kronecker blocks (attention's q, k, v
      projections), each with its own factors, min-max and eigenbasis;
    * :meth:`regions` lets a block own a row range of a packed parameter (``in_proj_weight``);
    * :meth:`capture_forward` captures a *functional* layer, one that computes its blocks
      inside its own ``forward`` (so no submodule hook can see them): the capture engine routes
      the module's forward through it while statistics are being gathered.
    """

    #: module classes this adapter handles
    module_types: tuple[type[nn.Module], ...] = ()
    #: match the exact class only (the official code matches by class name) instead of isinstance
    exact_type: bool = False

    def matches(self, module: nn.Module) -> bool:
        if self.exact_type:
            return original_class(module) in self.module_types
        return isinstance(module, self.module_types)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Role → parameter this adapter gives curvature to (default: weight, bias)."""
        out = {}
        for role in ("weight", "bias"):
            p = getattr(module, role, None)
            if isinstance(p, nn.Parameter):
                out[role] = p
        return out

    # -- several Kronecker blocks, packed parameters, functional layers ---------------------------
    def blocks(self, module: nn.Module) -> dict[str, LayerAdapter]:
        """The module's Kronecker blocks: block name → the adapter of that block.

        Each block becomes its own layer (a ``LayerRecord`` named ``"<module>.<block>"``) with its
        own factors, EMA, normalisation and eigenbasis, exactly as if it were a separate module;
        the block adapters are called with the original ``module``. Default: the module is one
        block, ``{"": self}`` (the layer keeps the module's name).
        """
        return {"": self}

    def regions(self, module: nn.Module) -> dict[str, slice]:
        """Role → the rows (a ``slice`` of dim 0) of the parameter that this block covers.

        For packed parameters (``in_proj_weight`` holds q, k, v one after the other): the block's
        curvature, :meth:`curvature_terms` and :meth:`to_matrix` / :meth:`from_matrix` are then
        about those rows only (the core passes and takes row slices). The blocks of a module
        must cover every row of a parameter they share, without overlap. Default: no region
        (the block covers its parameters whole).
        """
        return {}

    def capture_forward(
        self, module: nn.Module, observe: Observe, *args: Any, **kwargs: Any
    ) -> Any:
        """Functional layers (optional): ``module``'s forward, computed through observable steps.

        Implement it for a module that computes its Kronecker blocks inside its own ``forward``
        (``nn.MultiheadAttention`` projects q, k, v with slices of one parameter and applies
        ``out_proj`` functionally). Return exactly what ``module.forward(*args, **kwargs)``
        returns, with the same values, gradients and random-number consumption, and call
        ``observe(block, x, output)`` for every block computed: ``x`` is the tensor the block's
        input rows come from (passed to :meth:`input_diagonal` / :meth:`input_rows`), ``output``
        the tensor whose gradient is the block's g (hooked like a layer output). A submodule
        that is a layer itself is captured by its own hooks when the forward calls it; when the
        forward uses its weights functionally instead (as torch applies ``out_proj``), pass the
        submodule's name as ``block`` (``observe("out_proj", h, y)``): its own adapter then
        computes the statistics.

        The capture engine installs this as the module's forward when it attaches (an instance
        attribute, removed at detach) and calls it only while statistics are gathered (curvature
        step, training mode, grad enabled, not paused) on the hooked module itself; otherwise,
        and on deep copies and unpickled copies of the module, the original forward runs.
        """
        raise NotImplementedError(f"{type(self).__name__} has no capture_forward")

    @property
    def captures_forward(self) -> bool:
        """Whether this adapter implements :meth:`capture_forward`."""
        return type(self).capture_forward is not LayerAdapter.capture_forward

    def input_signature(self, module: nn.Module) -> Hashable | None:
        """What the input statistic depends on besides the input tensor, or None.

        Layers that read the same input tensor with equal signatures (the q/k/v projections of
        attention) share one input statistic per forward: the capture engine computes it once.
        None (the default) never shares.
        """
        return None

    # -- diagonal statistics -------------------------------------------------------------------
    @abstractmethod
    def input_diagonal(
        self, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        """Σ over rows of ā², accumulated in ``dtype`` (shape chosen by the adapter, see
        :meth:`curvature`)."""

    @abstractmethod
    def output_diagonal(
        self, module: nn.Module, grad_output: Tensor, dtype: torch.dtype
    ) -> Statistic:
        """Σ over rows of g², accumulated in ``dtype`` (one entry per output feature)."""

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Un-damped diagonal curvature per role as a broadcast product ``left * right``.

        ``left * right`` (``right`` None: ``left`` alone) must broadcast to a contiguous shape
        whose row-major layout is the parameter's (same number of entries). The core writes the
        product straight into a buffer it reuses across steps, so a diagonal Fisher costs one
        pass over the parameter and nothing is allocated.

        Default: Kronecker layout, ``F[o, i] = S[o] · H[i]`` for the (out, in[+1]) matrix view,
        last column → bias. ``H`` may carry a leading group dimension (grouped convolutions):
        output channel ``o`` of group ``k`` then uses ``H[k]``.
        """
        params = self.parameters(module)
        groups = H.shape[0] if H.dim() == 2 else 1
        n_weight = rows_numel(params["weight"].shape)  # not weight[0]: a DTensor would gather
        H2 = H.reshape(groups, 1, -1)
        S2 = S.reshape(groups, -1, 1)
        out: dict[str, tuple[Tensor, Tensor | None]] = {"weight": (S2, H2[..., :n_weight])}
        if "bias" in params:
            out["bias"] = (S2, H2[..., n_weight:])
        return out

    def curvature(self, module: nn.Module, H: Tensor, S: Tensor) -> dict[str, Tensor]:
        """Un-damped diagonal curvature per role, shaped like the parameters (new tensors).

        Derived from :meth:`curvature_terms`. An adapter may override this method instead
        (any layout); the core then copies its result into the reused buffer (one extra pass).
        """
        params = self.parameters(module)
        out = {}
        for role, (left, right) in self.curvature_terms(module, H, S).items():
            value = left if right is None else left * right
            out[role] = value.reshape(params[role].shape)
        return out

    # -- rows for the full / banded estimators --------------------------------------------------
    @property
    def supports_rows(self) -> bool:
        """Whether this adapter gives ā / g rows (needed by the full and banded estimators)."""
        return type(self).input_rows is not LayerAdapter.input_rows

    def groups(self, module: nn.Module) -> int:
        """Independent weight blocks (convolution groups): each gets its own factor pair."""
        return int(getattr(module, "groups", 1))

    def batch_size(self, module: nn.Module, grad_output: Tensor) -> int:
        """Samples in one call (the leading dim), for per-sample gradient scaling."""
        return grad_output.shape[0] if grad_output.dim() > 1 else 1

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """ā rows as (groups, rows, in_g[+1]); for the full and banded estimators."""
        raise NotImplementedError(
            f"{type(self).__name__} provides diagonal statistics only; "
            f"the full and banded estimators need input_rows()"
        )

    def input_gram(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Statistic | None:
        """``Σ ā āᵀ`` over the input rows, (groups, in_g[+1], in_g[+1]) in ``dtype``, with the
        row count, where this adapter computes it more cheaply than from :meth:`input_rows`
        (the full estimator asks first); None (the default): the estimator multiplies the
        rows."""
        return None

    def output_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """g rows as (rows, out); for the full and banded estimators."""
        raise NotImplementedError(
            f"{type(self).__name__} provides diagonal statistics only; "
            f"the full and banded estimators need output_rows()"
        )

    def to_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        """Parameter-shaped tensors (weight [, bias]) → the (groups, out_g, in_g[+1]) matrix view
        on which ``G ⊗ A`` acts (bias as the last column; a missing role is zeros)."""
        return join_columns(self.matrix_columns(module, tensors))

    def matrix_columns(self, module: nn.Module, tensors: dict[str, Tensor]) -> list[Tensor]:
        """:meth:`to_matrix`'s matrix as blocks of columns (views where possible), whose
        concatenation along the last dim it is: here the weight's columns and the bias column,
        so that a solver can multiply them where they lie instead of copying them together
        (``curvlab.kronecker.sandwich``). An adapter that overrides :meth:`to_matrix` gets its
        matrix as one block."""
        if type(self).to_matrix is not LayerAdapter.to_matrix:
            return [self.to_matrix(module, tensors)]
        params = self.parameters(module)
        weight = tensors.get("weight")
        if weight is None:
            weight = torch.zeros_like(params["weight"])
        out = weight.shape[0]
        g = self.groups(module)
        columns = [weight.reshape(g, out // g, math.prod(weight.shape[1:]))]  # out may be 0
        if "bias" in params:
            bias = tensors.get("bias")
            if bias is None:
                bias = weight.new_zeros(out)
            columns.append(bias.reshape(g, out // g, 1).to(weight.dtype))
        return columns

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`to_matrix`."""
        params = self.parameters(module)
        weight = params["weight"]
        out = weight.shape[0]
        matrix = matrix.reshape(out, -1)
        n_weight = rows_numel(weight.shape)
        result = {"weight": matrix[:, :n_weight].reshape(weight.shape)}
        if "bias" in params:
            result["bias"] = matrix[:, n_weight]
        return result

    @property
    def default_matrix_layout(self) -> bool:
        """Whether :meth:`to_matrix` and :meth:`from_matrix` are this class's (weight columns,
        then the bias column), so that the column blocks can be read without joining them."""
        cls, base = type(self), LayerAdapter
        return cls.to_matrix is base.to_matrix and cls.from_matrix is base.from_matrix

    def from_columns(self, module: nn.Module, columns: list[Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`matrix_columns` (a solver's product of the blocks, same widths);
        an adapter that overrides :meth:`to_matrix` or :meth:`from_matrix` gets the joined
        matrix through its :meth:`from_matrix`."""
        if not self.default_matrix_layout or len(columns) == 1:
            return self.from_matrix(module, join_columns(columns))
        params = self.parameters(module)
        # rows from the blocks: also a rank's rows of a sharded parameter (the sharded solve)
        result = {"weight": columns[0].reshape(-1, *params["weight"].shape[1:])}
        if "bias" in params:
            result["bias"] = columns[1].reshape(-1)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def join_columns(columns: list[Tensor]) -> Tensor:
    """The matrix whose blocks of columns these are (:meth:`LayerAdapter.matrix_columns`)."""
    return columns[0] if len(columns) == 1 else torch.cat(columns, dim=-1)


def square_sum(x: Tensor, dims: int | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Σ x² over ``dims`` accumulated in ``dtype`` (fp32 under fp16/bf16 autocast).

    When the innermost dim is reduced, a fused L2 norm (squared) reads x once without a
    temporary (about 4× faster than ``(x * x).sum`` for NCHW over (0, 2, 3) on CPU); a
    reduction over leading dims only keeps ``(x * x).sum``, which is faster there.
    """
    dims_t = (dims,) if isinstance(dims, int) else tuple(dims)
    if (x.dim() - 1) in dims_t or -1 in dims_t:
        if x.dtype in (torch.float16, torch.bfloat16):
            return torch.linalg.vector_norm(x, 2, dim=dims_t, dtype=dtype).square()
        return torch.linalg.vector_norm(x.to(dtype), 2, dim=dims_t).square()
    x = x.to(dtype)
    if x.device.type == "cpu":  # the temporary x² in reused memory (curvlab.scratch)
        return torch.mul(x, x, out=scratch(x.shape, dtype, x.device)).sum(dims_t)
    return (x * x).sum(dims_t)
