"""CurvatureOptimizer: assembles the plugin pipeline into a ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import lifecycle, registry
from curvlab.api_checks import (
    CurvatureNotCapturedWarning,  # noqa: F401 - part of this module's interface
    check_new_parameters,
    check_parameters_belong_to,
    warn_if_nothing_captured,
)
from curvlab.buffer_guard import BufferGuard
from curvlab.capture import statistics_dtype
from curvlab.coverage import Coverage, FallbackCoverage, LayerCoverage
from curvlab.factor_store import DiagonalFactorStore
from curvlab.interfaces import (
    Backend,
    DampingPolicy,
    FactorEstimator,
    FallbackPolicy,
    LayerAdapter,
    Normalizer,
    Reducer,
    UpdateRule,
)
from curvlab.interfaces.estimator import STRUCTURES
from curvlab.interfaces.update import known_flag
from curvlab.kronecker import KroneckerOperator, KroneckerSolver, RefreshItem, refresh_cost
from curvlab.layers import FallbackParameter, adapter_name, pair_parameters
from curvlab.preconditioner import CurvaturePreconditioner, LayerFactors, Workspace
from curvlab.regions import shared_parameters
from curvlab.sharding import (
    LocalState,
    LocalViews,
    RowShard,
    as_global,
    is_sharded,
    local,
    original_class,
    row_shard,
)
from curvlab.validation import check_choice, check_positive_int, check_range

#: adapters of the paper variant, tried in this order ("conv2d" before "conv": a Conv2d layer
#: keeps the adapter class name that checkpoints record in their layers_description)
PAPER_ADAPTERS = (
    "linear",
    "conv2d",
    "conv",
    "conv_transpose",
    "batchnorm",
    "layernorm",
    "groupnorm",
    "embedding",
    "multihead_attention",
)
#: RMS-type norms (nn.RMSNorm; transformers' classes through register_layer) and transformers'
#: Conv1D (looked up lazily: transformers is never imported by curvlab)
PAPER_ADAPTERS += ("rmsnorm", "hf_conv1d")
EMA_SEMANTICS = ("paper", "official")


def _detach(backend: Backend, guard: BufferGuard, reducer: Reducer) -> None:
    """Remove every hook an optimizer installed (its backend's, its buffer guard's and the
    reducer's listeners)."""
    backend.detach()
    guard.detach()
    reducer.detach()


class CurvatureFallbackWarning(UserWarning):
    """Some trainable parameters have no layer curvature (listed in the message, with what they
    get instead and how to fix it)."""


#: appended to the fallback warning
FALLBACK_FIXES = (
    "Fixes: map a layer class onto an adapter that reads it with "
    "curvlab.register_layer(LayerClass, 'adapter_name', **options) (docs/layers.md), or choose "
    "another rule with fallback='squared_gradient' (their own diagonal Fisher) or "
    "fallback='error'; opt.coverage() lists every layer and parameter."
)


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""A Kronecker-factored curvature optimizer assembled from plugins.

    One ``step()``: the layers' statistics captured since the last step (if this is a
    curvature step, every ``curvature_interval`` steps) are reduced across ranks and folded
    into an EMA per layer; each parameter's preconditioner is built from the normalised,
    damped factors; the update rule applies it. With the paper's parts (``configs/adafisher.gin``)::

        H ← γ H + (1−γ) Ĥ,   S ← γ S + (1−γ) Ŝ
        F = minmax(S) ⊗ minmax(H) + λ
        m ← β m + (1−β) g,   θ ← θ − α (m / (1−β^t)) / F

    ``ema="official"`` instead folds ``H ← 0.1γ H + 0.01γ normalizer(Ĥ)`` from ones (SPEC §3).

    Args:
        model: the module whose layers are hooked; parameters are paired with layers by identity.
        params: parameters or param-group dicts to optimize (default: the model's trainable ones).
        lr, beta, weight_decay: per-group defaults (α, β, κ).
        gamma: factor EMA decay γ ∈ [0, 1); 0 disables the EMA.
        damping: λ (> 0) or a :class:`DampingPolicy` / its registered name.
        curvature_interval: statistics are captured and folded in on steps ``t % k == 0``.
        inverse_interval: what banded/full layers are solved with (eigenbases, inverses of the
            damped factors; :attr:`kronecker_solver`) is refreshed from their factors every k
            steps.
        adapters, estimator, normalizer, update_rule, reducer, backend: plugins or their names.
        ema: ``"paper"`` (EMA of raw factors, normalised afterwards) or ``"official"``.
        ema_bias_correction: divide the EMA by ``1 − γ^t`` (Adam's second-moment correction).
        fallback: what parameters without layer curvature get (a :class:`FallbackPolicy` or
            its name): ``"identity"`` (``F`` constant), ``"squared_gradient"`` (their own
            normalised EMA of g², damped like the layers), ``"error"`` (refuse them).
        damp_fallback: the constant ``F`` of parameters without curvature of their own:
            ``1 + λ`` (True, the paper) or ``1`` (the official code).
        allow_no_supported_layer: otherwise a model without any supported layer is an error.
        exclusive: a new exclusive optimizer on layers another live one has hooked detaches that
            one (with an ``OptimizerReplacedWarning``; ``curvlab.lifecycle``). ``False`` shares
            the layers instead: the optimizer neither replaces nor is replaced (e.g. a
            learning-rate-0 optimizer that only accumulates full factors for an analysis next
            to the one that trains).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        gamma: float = 0.8,
        damping: float | str | DampingPolicy = 1e-3,
        curvature_interval: int = 1,
        inverse_interval: int = 1,
        adapters: Sequence[str | LayerAdapter] = PAPER_ADAPTERS,
        estimator: str | FactorEstimator = "diagonal",
        normalizer: str | Normalizer = "minmax",
        update_rule: str | UpdateRule = "adafisher",
        reducer: str | Reducer = "none",
        backend: str | Backend = "native",
        fallback: str | FallbackPolicy = "identity",
        ema: str = "paper",
        ema_bias_correction: bool = False,
        damp_fallback: bool = True,
        allow_no_supported_layer: bool = False,
        warn_on_fallback: bool = True,
        exclusive: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module (curvature needs its layers), "
                f"got {type(model).__name__}"
            )
        check_range("lr", lr, 0.0)
        check_range("beta", beta, 0.0, 1.0, high_inclusive=False)
        check_range("weight_decay", weight_decay, 0.0)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, high_inclusive=False)
        self.curvature_interval = check_positive_int("curvature_interval", curvature_interval)
        self.inverse_interval = check_positive_int("inverse_interval", inverse_interval)
        self.ema = check_choice("ema", ema, EMA_SEMANTICS)
        self.ema_bias_correction = bool(ema_bias_correction)

        registry.load_builtin_plugins()
        if isinstance(damping, (int, float)) and not isinstance(damping, bool):
            check_range("damping", damping, 0.0, low_inclusive=False)
            damping = registry.create("damping", "constant", value=float(damping))
        self.damping: DampingPolicy = registry.create("damping", damping)
        if isinstance(adapters, str):
            adapters = [adapters]
        self.adapters: list[LayerAdapter] = [registry.create("adapters", a) for a in adapters]
        self.estimator: FactorEstimator = registry.create("estimators", estimator)
        self.normalizer: Normalizer = registry.create("normalizers", normalizer)
        self.update_rule: UpdateRule = registry.create("updates", update_rule)
        self.reducer: Reducer = registry.create("reducers", reducer)
        self.backend: Backend = registry.create("backends", backend)
        self.fallback: FallbackPolicy = registry.create("fallbacks", fallback)
        check_choice("estimator structure", self.estimator.structure, STRUCTURES)
        #: how banded/full layers are solved (chosen by the estimator from the damping mode)
        self.kronecker_solver: KroneckerSolver = self.estimator.kronecker_solver(
            self.damping.mode
        )
        if self.ema_bias_correction and self.estimator.structure != "elementwise":
            raise ValueError(
                "ema_bias_correction divides an elementwise EMA by 1 − γ^t; the estimator "
                f"structure is {self.estimator.structure!r} (use it with 'squared_gradient')"
            )
        if self.ema == "official" and self.estimator.structure != "diagonal":
            raise ValueError(
                f"ema='official' normalises each estimate before the EMA and is defined for the "
                f"diagonal estimator only; got estimator structure {self.estimator.structure!r}"
            )
        self.damp_fallback = bool(damp_fallback)
        self._allow_no_supported_layer = bool(allow_no_supported_layer)
        self._warn_on_fallback = bool(warn_on_fallback)
        self._exclusive = bool(exclusive)
        self.model = model

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay)
        defaults.update(self.update_rule.hyperparameters)
        self._ready = False
        super().__init__(params, defaults)

        self._step = 0
        self._capture_active = True
        self._capture_paused = False
        self._grad_scaler = None
        self.curvature_state: dict[str, dict[str, Tensor]] = {}
        #: diagonal layers' factors, packed; their curvature_state entries are views into it
        self._diagonal = DiagonalFactorStore(self.curvature_state)
        self._skipped: Tensor | None = None
        self._workspace = Workspace()  # reused curvature buffers (not state: never saved)
        self._terms_cache: tuple[object, object] = (None, None)
        self._warned_uncaptured = False
        #: banded/full layers: curvature updates folded in, and the count (and λ) at their
        #: last refresh (a refresh of unchanged factors is skipped; not state: never saved)
        self._factor_versions: dict[str, int] = {}
        self._refreshed_versions: dict[str, tuple[int, float | None]] = {}
        #: True once a curvature step captured any layer (before that, "never captured" means
        #: nothing ran yet, not that a layer is used functionally)
        self._seen_capture = False
        self._closed = False
        self._checked_sharding = False
        #: stable local tensors of FSDP2 parameters (buffers are cached by tensor identity)
        self._local_views = LocalViews()
        #: what the hooks call: the optimizer through a weak reference (curvlab.lifecycle)
        self._capture_gate = lifecycle.weak_gate(self)
        self._warned_not_training = False
        self._ready = True
        self._pair_layers()
        #: undoes the buffer updates (BatchNorm statistics) of a skipped step
        self._buffer_guard = BufferGuard(model)
        # a dropped optimizer's hooks go with it (neither the backend nor the guard references
        # the optimizer)
        self._finalizer = weakref.finalize(
            self, _detach, self.backend, self._buffer_guard, self.reducer
        )

    # -- assembly ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_new_parameters(param_group, self.model, len(self.param_groups))
        for key in ("lr", "beta", "weight_decay"):
            if key in param_group:
                bounds = {"lr": (0.0, None), "beta": (0.0, 1.0), "weight_decay": (0.0, None)}[key]
                check_range(
                    f"param_group[{key!r}]", param_group[key], *bounds, high_inclusive=key != "beta"
                )
        super().add_param_group(param_group)
        if getattr(self, "_ready", False) and not self._closed:
            self._pair_layers()

    def _trainable(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _pair_layers(self) -> None:
        self.backend.detach()
        self.reducer.detach()
        self._terms_cache = (None, None)  # products are per layer record
        if self.estimator.structure == "elementwise":  # every parameter has its own curvature
            self.layers, self._fallback, self._shared = [], [], set()
            self._fallback_tensors: list[Tensor] = []
            self._layer_by_name = {}
            return
        captured = {r.name for r in getattr(self, "layers", []) if r.captured}
        lifecycle.release(self, [r.module for r in getattr(self, "layers", [])])
        trainable = self._trainable()
        self.layers, self._fallback = pair_parameters(self.model, self.adapters, trainable)
        claimed = {id(p) for r in self.layers for p in r.params.values()}
        # the same order as self._fallback (pair_parameters walks ``trainable``)
        self._fallback_tensors = [p for p in trainable if id(p) not in claimed]
        self._layer_by_name = {r.name: r for r in self.layers}
        for record in self.layers:  # re-pairing (add_param_group) keeps what was captured
            record.captured = record.name in captured
        for record in self.layers:
            record.structure = self.estimator.layer_structure(record.adapter)
        self._shared = shared_parameters(self.layers)
        if not self.layers and not self._allow_no_supported_layer:
            check_parameters_belong_to(self.model, self._trainable())
            supported = ", ".join(t.__name__ for a in self.adapters for t in a.module_types)
            raise ValueError(
                f"the model has no layer that the adapters "
                f"{[type(a).__name__ for a in self.adapters]} "
                f"support (supported module types: {supported}); pass "
                f"allow_no_supported_layer=True to train every parameter with identity curvature"
            )
        self.fallback.check(self._fallback)
        taken = (
            lifecycle.claim(self, [(r.name, r.module) for r in self.layers])
            if self._exclusive
            else []
        )
        if taken:
            warnings.warn(
                lifecycle.replaced_message(type(self).__name__, taken),
                lifecycle.OptimizerReplacedWarning,
                stacklevel=3,
            )
        self.backend.attach(self.layers, self.estimator, self._capture_gate, model=self.model)
        self.reducer.attach(self.layers)
        if self._fallback and self._warn_on_fallback:
            listing = "\n  ".join(map(str, self._fallback))
            warnings.warn(
                f"{len(self._fallback)} trainable parameter(s) have no layer curvature and get "
                f"{self._fallback_description()}:\n  {listing}\n{FALLBACK_FIXES}",
                CurvatureFallbackWarning,
                stacklevel=3,
            )

    def _fallback_description(self) -> str:
        name = getattr(type(self.fallback), "plugin_name", type(self.fallback).__name__)
        constant = "1 + λ" if self.damp_fallback else "1"
        return f"the {name!r} fallback rule: {self.fallback.describe(constant)}"

    def _is_capturing(self) -> bool:
        return self._capture_active and not self._capture_paused

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook this optimizer installed on the model and drop its statistics and
        reused buffers (idempotent). Parameters, ``state`` and ``state_dict()`` stay readable;
        ``step()`` raises afterwards. Also happens when the optimizer is garbage-collected, and
        when a newer curvlab optimizer is built on the same layers (with a warning)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _detach(self.backend, self._buffer_guard, self.reducer)
        for record in self.layers:
            record.clear()
        lifecycle.release(self, [r.module for r in self.layers])
        self._workspace = Workspace()
        self._terms_cache = (None, None)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (explicitly, or because a newer optimizer took over)."""
        return self._closed

    def __enter__(self) -> CurvatureOptimizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def attach_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Keep factors in the units of the unscaled loss under ``torch.amp.GradScaler``.

        The hooks see gradients of the *scaled* loss, so output statistics carry the scale².
        With the scaler attached, each curvature step divides them by its current scale (read
        on device, no host synchronisation). Min-max variants are nearly scale-free anyway;
        K-FAC (identity normaliser) needs this to train under a GradScaler.
        """
        self._grad_scaler = scaler

    def _loss_scale(self) -> Tensor | None:
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # created by the first scaler.scale(loss)

    @contextlib.contextmanager
    def pause_capture(self) -> Iterator[None]:
        """Forwards inside this block add no curvature statistics (e.g. the gradient pass after
        separate type-2 or MC curvature passes, or a training-mode evaluation with grad)."""
        previous, self._capture_paused = self._capture_paused, True
        try:
            yield
        finally:
            self._capture_paused = previous

    # -- introspection ----------------------------------------------------------------------------
    def fallback_parameters(self) -> list[FallbackParameter]:
        """Trainable parameters without layer curvature (the fallback rule applies), each with
        the reason."""
        return [entry for entry, _ in self._uncovered()]

    def _uncovered(self) -> list[tuple[FallbackParameter, Tensor]]:
        """Parameters without an adapter, then (once any layer was captured) the parameters of
        paired layers that never were."""
        out = list(zip(self._fallback, self._fallback_tensors))
        if self._seen_capture:
            for record in self.layers:
                if not record.captured:
                    for role, p in record.params.items():
                        entry = FallbackParameter(
                            f"{record.name}.{role}",
                            tuple(p.shape),
                            "its layer never ran a captured forward/backward (e.g. the "
                            "model calls F.linear on its weight instead of the module)",
                        )
                        out.append((entry, p))
        return out

    def coverage(self) -> Coverage:
        """Per layer and per fallback parameter: the adapter or fallback rule and the number of
        elements, and the share of trainable elements with layer curvature (docs/layers.md).

        Before the first curvature step every paired layer counts as covered; afterwards a
        layer that was never captured counts as fallback (see :meth:`fallback_parameters`).
        """
        trainable = self._trainable()
        total = sum(p.numel() for p in trainable)
        if self.estimator.structure == "elementwise":
            name = getattr(type(self.estimator), "plugin_name", type(self.estimator).__name__)
            return Coverage((), (), total, total, "", elementwise=name)
        trainable_ids = {id(p) for p in trainable}
        rule = getattr(type(self.fallback), "plugin_name", type(self.fallback).__name__)
        uncovered = self._uncovered()
        uncovered_ids = {id(p) for _, p in uncovered}
        layers = tuple(
            LayerCoverage(
                record.name,
                original_class(record.module).__name__,
                adapter_name(record.adapter),
                sum(p.numel() for p in record.params.values() if id(p) in trainable_ids),
            )
            for record in self.layers
            if not (self._seen_capture and not record.captured)
        )
        fallback = tuple(
            FallbackCoverage(entry.name, entry.shape, p.numel(), rule, entry.reason)
            for entry, p in uncovered
            if id(p) in trainable_ids
        )
        covered = sum(p.numel() for p in trainable if id(p) not in uncovered_ids)
        return Coverage(layers, fallback, covered, total, rule)

    def preconditioner(self, param: Tensor) -> Tensor:
        """The current diagonal preconditioner ``F`` of ``param`` (damping included)."""
        if not any(param is p for p in self._trainable()):
            raise ValueError("preconditioner(): the tensor is not a parameter of this optimizer")
        return self._make_preconditioner().dense_diagonal(param).clone()

    def metrics(self) -> dict[str, int]:
        """Counters: optimizer steps taken and steps skipped on a non-finite value."""
        skipped = 0 if self._skipped is None else int(self._skipped.item())
        return {"steps": self._step, "skipped_steps": skipped}

    @property
    def is_curvature_step(self) -> bool:
        """Whether the forward/backward passes before the next ``step()`` are captured."""
        return self._capture_active

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and, with them, the curvature statistics of backward passes whose
        gradients are being discarded (a forward whose backward comes later still counts)."""
        super().zero_grad(set_to_none=set_to_none)
        for record in self.layers:
            record.clear()
        self.reducer.discard_reduced()

    # -- the step ---------------------------------------------------------------------------------
    def _fallback_value(self, damping: float) -> float:
        return 1.0 + damping if self.damp_fallback else 1.0

    def _layer_factors(
        self, damping: float | None = None
    ) -> dict[str, LayerFactors | KroneckerOperator]:
        """Normalised factors per layer: entries (diagonal), or the solver's operator
        (banded/full) at ``damping`` (default: this step's λ)."""
        if damping is None:
            damping = self.damping.value(self._step)
        paper = self.ema == "paper"
        # paper: normalised, and identity (H' = S' = 1) until the first accepted update
        diagonal = self._diagonal.factors(self.normalizer if paper else None, guard=paper)
        out: dict[str, LayerFactors | KroneckerOperator] = {}
        for name, (H, S) in diagonal.items():
            out[name] = LayerFactors("diagonal", H, S)
        items = self._kronecker_items()
        if items:
            operators = self.kronecker_solver.operators(
                items, self.normalizer, damping, self.damping.mode
            )
            out.update({item.name: op for item, op in zip(items, operators)})
        return out

    def _kronecker_items(self) -> list[RefreshItem]:
        """Banded/full layers that have factors, in layer order."""
        items = []
        for record in self.layers:
            state = self.curvature_state.get(record.name)
            if record.structure != "diagonal" and state is not None:
                items.append(RefreshItem(record.name, record.structure, state))
        return items

    def _refresh_solver(self) -> None:
        """Refresh what banded/full layers are solved with (:attr:`kronecker_solver`): every
        ``inverse_interval`` steps, for a layer whose first factors arrived in between, and
        never for a layer whose factors (and, for a solver that bakes it in, λ) are the same
        as at its last refresh (the result would be the same)."""
        solver = self.kronecker_solver
        due = self._step % self.inverse_interval == 0
        damping = self.damping.value(self._step)
        stale = []
        for item in self._kronecker_items():
            version = (
                self._factor_versions.get(item.name, 0),
                damping if solver.uses_damping else None,
            )
            if solver.is_stale(item.state) or (
                due and self._refreshed_versions.get(item.name) != version
            ):
                stale.append(item)
                self._refreshed_versions[item.name] = version
        if not stale:
            return
        owners = self.reducer.split_refresh([refresh_cost(item) for item in stale])
        if owners is None:
            solver.refresh(stale, self.normalizer, damping, self.damping.mode)
            return
        # KAISA: each layer refreshed on its owner rank, the results shared with the others
        rank = self.reducer.rank
        mine = [item for item, owner in zip(stale, owners) if owner == rank]
        if mine:
            solver.refresh(mine, self.normalizer, damping, self.damping.mode)
        keys = solver.state_keys
        shared = self.reducer.share(
            [
                item.state[k] if owner == rank else None
                for item, owner in zip(stale, owners)
                for k in keys
            ],
            [owner for owner in owners for _ in keys],
            self._device(),
        )
        for n, item in enumerate(stale):
            for j, key in enumerate(keys):
                item.state[key] = shared[n * len(keys) + j]

    def _elementwise_curvature(self) -> dict[int, Tensor]:
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "curvature" in state:
                    F = state["curvature"]
                    if self.ema_bias_correction:
                        t = state["curvature_steps"].clamp_min(1).to(F.dtype)
                        F = F / (1.0 - self.gamma**t)
                    out[id(p)] = F
        return out

    def _fallback_curvature(self) -> dict[int, Tensor]:
        """The fallback policy's curvature of each parameter without layer curvature.

        A sharded parameter's state is gathered first (an all-gather of its state, every
        curvature rank in the same order): the policy normalises over the whole parameter.
        """
        out = {}
        for _, p in self._uncovered():
            state = self.state.get(p, {})
            if is_sharded(p):
                state = {k: v.full_tensor() if is_sharded(v) else v for k, v in state.items()}
            F = self.fallback.curvature(p, state, self.normalizer)
            if F is not None:
                out[id(p)] = F
        return out

    def _update_fallback(self, ok: Tensor) -> None:
        """Fold this curvature step into the fallback policy's per-parameter state."""
        params, grads, states = [], [], []
        for _, p in self._uncovered():
            if p.grad is not None and p in self.state:
                sharded = is_sharded(p)
                params.append(local(p))
                grads.append(local(p.grad))
                states.append(LocalState(self.state[p], p) if sharded else self.state[p])
        if params:
            self.fallback.update(params, grads, states, ok, self.gamma)

    def _make_preconditioner(
        self, shards: dict[int, RowShard] | None = None
    ) -> CurvaturePreconditioner:
        damping = self.damping.value(self._step)
        # the diagonal layers' products view the packed factors, which are refreshed in place:
        # they stay valid until a re-pack (products that are new tensors are rebuilt anyway)
        key = (self._diagonal.layout_version, self.ema, self.damping.mode)
        cached = self._terms_cache[1] if self._terms_cache[0] == key else None
        precond = CurvaturePreconditioner(
            self.layers,
            self._layer_factors(damping),
            self._elementwise_curvature(),
            damping,
            self.damping.mode,
            self._fallback_value(damping),
            self._shared,
            self._workspace,
            cached=cached,
            stable_storages=self._diagonal.storages(),
            fallback_curvature=self._fallback_curvature(),
            shards=shards,
        )
        self._terms_cache = (key, precond.cached_terms)
        return precond

    def _reduce_statistics(
        self, grads: list[Tensor], device: torch.device
    ) -> tuple[dict[str, tuple[Tensor, Tensor, Any, Any]], Tensor]:
        """This step's factor totals and row counts per layer (summed over ranks), and the
        step's finite flag: ``{name: (H_total, S_total, H_count, S_count)}``.

        The flag covers the gradients and the local statistics on every rank; with statistics
        to reduce it travels in the same collective (``Reducer.reduce_with_flag``).
        """
        # what the reducer already summed over ranks during the backward passes (a reducer
        # that overlaps its collectives with backward; {} otherwise)
        early = self.reducer.take_reduced()
        if not self._capture_active:
            early = {}
        records = [r for r in self.layers if r.has_statistics] if self._capture_active else []
        totals, counts = [], []
        for record in records:
            for stat in record.take():
                totals.append(stat.total)
                counts.append(stat.count)
        scale = self._loss_scale() if records or early else None
        if scale is not None:  # output statistics (odd entries) carry the loss scale squared
            for i in range(1, len(totals), 2):
                totals[i] = totals[i] / scale.to(totals[i].dtype).square()
            early = {
                name: (H, S / scale.to(S.dtype).square(), *counts_)
                for name, (H, S, *counts_) in early.items()
            }
        # the small statistics checked as one vector per dtype (one norm, not one per layer);
        # large ones (full factors) on their own, rather than copied into that vector
        packed: dict[torch.dtype, list[Tensor]] = {}
        large = []
        for t in totals + [t for stat in early.values() for t in stat[:2]]:
            if t.numel() > 65536:
                large.append(t)
            else:
                packed.setdefault(t.dtype, []).append(t.reshape(-1))
        local_ok = self._local_finite(
            grads + large + [torch.cat(v) for v in packed.values()], device
        )
        if not records:
            return early, self.reducer.all_finite(local_ok)
        totals, counts, ok = self.reducer.reduce_with_flag(totals, counts, local_ok)
        stats = {
            r.name: (totals[2 * i], totals[2 * i + 1], counts[2 * i], counts[2 * i + 1])
            for i, r in enumerate(records)
        }
        if early:  # both: sums of sums, in layer order
            merged = {}
            for record in self.layers:
                a, b = stats.get(record.name), early.get(record.name)
                if a is not None and b is not None:
                    merged[record.name] = tuple(x + y for x, y in zip(a, b))
                elif a is not None or b is not None:
                    merged[record.name] = a if a is not None else b
            stats = merged
        return stats, ok

    @staticmethod
    def _local_finite(tensors: list[Tensor], device: torch.device) -> Tensor:
        """One on-device flag: every entry of every tensor is finite (no host sync).

        A NaN or inf entry makes the sum of squares of its tensor non-finite, and so does a
        sum that overflows fp32 (entries beyond ~1e19): such a step is skipped rather than risk
        an inf update (an inf g² would freeze Adam-like curvature for good). On CUDA: one
        multi-tensor L2 norm per dtype (one fused kernel; fp16/bf16 accumulate in fp32). On
        CPU, where ``_foreach_norm`` runs one slow norm per tensor: one BLAS dot per tensor,
        2x faster (measured on the GPT benchmark's gradients).
        """
        if not tensors:
            return torch.ones((), dtype=torch.bool, device=device)
        low = [t for t in tensors if t.dtype in (torch.float16, torch.bfloat16)]
        high = [t for t in tensors if t.dtype not in (torch.float16, torch.bfloat16)]
        if device.type == "cpu" and high:
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for t in high:
                by_dtype.setdefault(t.dtype, []).append(torch.dot(t.reshape(-1), t.reshape(-1)))
            # norms (square roots) before fp32, as on CUDA: fp64 entries of 1e20 are fine
            norms = [torch.stack(d).sqrt().to(torch.float32) for d in by_dtype.values()]
            if low:
                norms.append(torch.stack(torch._foreach_norm(low, 2, dtype=torch.float32)))
            return torch.cat(norms).sum().isfinite()
        norms = list(torch._foreach_norm(high, 2)) if high else []
        if low:
            norms += torch._foreach_norm(low, 2, dtype=torch.float32)
        return torch.stack([n.to(torch.float32) for n in norms]).sum().isfinite()

    def _update_factors(
        self, stats: dict[str, tuple[Tensor, Tensor, Any, Any]], ok: Tensor
    ) -> None:
        g = self.gamma
        paper = self.ema == "paper"
        diagonal = {
            name: stat
            for name, stat in stats.items()
            if self._layer_by_name[name].structure == "diagonal"
        }
        if diagonal:
            if paper:
                blend = lambda ema, estimate: g * ema + (1.0 - g) * estimate  # noqa: E731
            else:  # official: normalised estimates, blended with 0.1γ and 0.01γ (SPEC §3)
                blend = lambda ema, estimate: (0.1 * g) * ema + (0.01 * g) * estimate  # noqa: E731
            self._diagonal.update(
                diagonal, ok, blend, 0.0 if paper else 1.0, None if paper else self.normalizer
            )
        known = known_flag(ok)
        for name, (H_total, S_total, H_count, S_count) in stats.items():
            if name in diagonal:
                continue
            state = self.curvature_state.get(name)
            if state is None:
                state = {
                    "H": torch.zeros_like(H_total),
                    "S": torch.zeros_like(S_total),
                    "updated": torch.zeros((), dtype=torch.bool, device=H_total.device),
                }
                self.curvature_state[name] = state
            # (official EMA is diagonal-only, checked in __init__)
            for key, total, count in (("H", H_total, H_count), ("S", S_total, S_count)):
                if known is None:  # on a device: blend with the flag
                    ema = state[key]
                    state[key] = torch.where(ok, g * ema + (1.0 - g) * (total / count), ema)
                elif known:  # on CPU (flag read for free): in place, two passes over d²
                    if isinstance(count, Tensor):
                        total, count = total / count, 1
                    state[key].mul_(g).add_(total, alpha=(1.0 - g) / count)
            state["updated"] = state["updated"] | ok
            self._factor_versions[name] = self._factor_versions.get(name, 0) + 1

    def _update_elementwise(self, work: list, ok: Tensor) -> None:
        """EMA of an elementwise estimator's statistic, per parameter (Adam's v)."""
        g = self.gamma
        okf = ok.to(torch.float32)
        for group, params, grads, states in work:
            for p, grad, state in zip(params, grads, states):
                stat = self.estimator.gradient_statistic(p, torch.where(ok, grad, 0.0), group)
                if "curvature" not in state:
                    state["curvature"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["curvature_steps"] = torch.zeros((), dtype=torch.float32, device=p.device)
                F = state["curvature"]
                F.copy_(torch.where(ok, g * F + (1.0 - g) * stat, F))
                state["curvature_steps"].add_(okf)

    def _warn_uncaptured_once(self) -> None:
        if self._warned_uncaptured:
            return
        self._warned_uncaptured = True
        missing = [r.name for r in self.layers if not r.captured]
        if missing:
            self.fallback.check(self.fallback_parameters()[len(self._fallback) :])
        if missing and self._warn_on_fallback:
            warnings.warn(
                f"layers with supported types but no statistics in the first curvature step that "
                f"captured any layer get {self._fallback_description()} until they are "
                f"captured: "
                f"{', '.join(missing)} "
                f"(see fallback_parameters())",
                CurvatureFallbackWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        """One optimizer step (optionally re-evaluating the loss with ``closure``)."""
        if self._closed:
            raise RuntimeError(
                f"{type(self).__name__}.step(): this optimizer is closed (close(), the end of a "
                f"`with` block, or a newer curvlab optimizer built on the same model took over "
                f"its layers); build a new one"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        all_grads = []
        #: FSDP2 parameters (DTensors): the step works on their rank-local rows (curvlab.sharding)
        shards: dict[int, RowShard] = {}
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "curvlab optimizers do not support sparse gradients "
                        "(use nn.Embedding(sparse=False))"
                    )
                state = self.state[p]
                if is_sharded(p):
                    shard = shards[id(p)] = row_shard(p, self._local_views(p))
                    if not state:
                        for key, value in self.update_rule.init_state(shard.local).items():
                            state[key] = as_global(value, p)
                    params.append(shard.local)
                    grads.append(local(p.grad))
                    states.append(LocalState(state, p))
                    continue
                if not state:
                    state.update(self.update_rule.init_state(p))
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if params:
                work.append((group, params, grads, states))
                all_grads.extend(grads)
        if shards and not self._checked_sharding:
            self._check_sharding(shards)
        device = self._device()
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)

        if self._capture_active:
            self.backend.collect()
            warn_if_nothing_captured(self, all_grads)
        stats, ok = self._reduce_statistics(all_grads, device)
        if stats and not self._seen_capture:
            self._seen_capture = True
            self._warn_uncaptured_once()
        if stats:
            self._update_factors(stats, ok)
        if self._capture_active:
            self._update_fallback(ok)
        if self.estimator.structure == "elementwise" and self._capture_active:
            self._update_elementwise(work, ok)
        self._refresh_solver()

        self.update_rule.update(work, self._make_preconditioner(shards), ok)
        self._buffer_guard.restore(ok)

        self._skipped += (~ok).to(torch.int64)
        self._step += 1
        self._capture_active = self._step % self.curvature_interval == 0
        for record in self.layers:  # statistics of non-curvature steps are never kept
            record.clear()
        return loss

    def _check_sharding(self, shards: dict[int, RowShard]) -> None:
        """Sharded parameters on several ranks need statistics and the finite flag reduced
        across ranks: every rank holds different rows, so a rank-local flag would let the
        ranks skip different steps, and local statistics would give each shard other factors."""
        ranks = max(shard.ranks for shard in shards.values())
        if ranks > 1 and getattr(self.reducer, "world_size", 1) == 1:
            raise ValueError(
                f"parameters sharded over {ranks} ranks (FSDP2) need reducer='torch_distributed' "
                f"(the reducer is {self.reducer!r}): curvature statistics and the finite flag "
                f"must be reduced across ranks"
            )
        if ranks > 1 and getattr(self.reducer, "finite_flag", "all_reduce") == "local":
            raise ValueError(
                "finite_flag='local' with parameters sharded by FSDP2: each rank checks only its "
                "own gradient rows, so the flag must be all-reduced (finite_flag='all_reduce')"
            )
        self._checked_sharding = True

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # -- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curvature"] = {
            "step": self._step,
            "skipped_steps": self._skipped,
            # diagonal layers' entries are views into the packed, in-place-updated factors:
            # snapshot them, as a checkpoint must not change while training goes on
            # and the banded/full EMA factors are updated in place on CPU
            "layers": {
                name: {k: v.clone() for k, v in state.items()}
                if name in self._diagonal
                else {k: v.clone() if k in ("H", "S") else v for k, v in state.items()}
                for name, state in self.curvature_state.items()
            },
            "layer_names": [r.name for r in self.layers],
            "layers_description": self._describe_layers(),
        }
        return sd

    def _shard_loaded_state(self) -> None:
        """Whole per-parameter state (a state saved by one process, loaded on every rank)
        of a sharded parameter becomes its rows, as a DTensor laid out like the parameter."""
        for p, state in self.state.items():
            if not is_sharded(p):
                continue
            shard = row_shard(p)
            for key, value in state.items():
                if isinstance(value, Tensor) and not is_sharded(value) and value.dim():
                    if value.shape == p.shape:
                        rows = value[shard.start : shard.stop].clone()
                        state[key] = as_global(rows, p)

    def _describe_layers(self) -> list[tuple]:
        """What a layer's factors depend on: name, adapter, structure, parameter shapes."""
        return [
            (
                r.name,
                type(r.adapter).__name__,
                r.structure,
                tuple((role, tuple(p.shape)) for role, p in r.params.items()),
            )
            for r in self.layers
        ]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature", None)
        if curvature is None:
            raise ValueError(
                "load_state_dict: this is not a curvlab optimizer state (no 'curvature' entry)"
            )
        expected = [tuple(d) for d in self._describe_layers()]
        saved = curvature.get("layers_description")
        saved = [tuple(d) for d in saved] if saved is not None else None
        if saved != expected:
            mismatch = [
                f"    saved {s!r}\n    here  {e!r}" for s, e in zip(saved or [], expected) if s != e
            ]
            raise ValueError(
                "load_state_dict: the state was saved for different layers "
                f"({len(saved or [])} saved, {len(expected)} here); first differences in "
                "(name, adapter, structure, parameter shapes):\n" + "\n".join(mismatch[:5])
            )
        # check every per-parameter state against its parameter before installing anything
        params = [p for group in self.param_groups for p in group["params"]]
        for index, state in state_dict.get("state", {}).items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                continue
            p = params[index]
            for key, value in state.items():
                if (  # 0-dim entries are counters and flags (step, curvature_steps, ...)
                    isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape
                ):
                    raise ValueError(
                        f"load_state_dict: state {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)} but the parameter has shape {tuple(p.shape)}"
                    )
        super().load_state_dict(state_dict)
        self._shard_loaded_state()
        device = self._device()
        self.curvature_state.clear()  # the same dict: the diagonal store holds it
        for name, state in curvature["layers"].items():
            record = self._layer_by_name[name]
            dtype = statistics_dtype(record.module)
            self.curvature_state[name] = {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).clone()
                for k, v in state.items()
            }
            record.captured = True
        self._refreshed_versions.clear()  # loaded solver state: refreshed at the next due step
        self._diagonal.adopt(
            [n for n in self.curvature_state if self._layer_by_name[n].structure == "diagonal"]
        )
        self._step = int(curvature["step"])
        skipped = curvature.get("skipped_steps")
        self._skipped = None if skipped is None else skipped.to(device).clone()
        self._capture_active = self._step % self.curvature_interval == 0
        self._seen_capture = self._warned_uncaptured = bool(self.curvature_state)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}={v!r}"
            for k, v in dict(
                adapters=[type(a).__name__ for a in self.adapters],
                estimator=self.estimator,
                normalizer=self.normalizer,
                damping=self.damping,
                update_rule=self.update_rule,
                reducer=self.reducer,
                backend=self.backend,
                fallback=self.fallback,
                ema=self.ema,
                gamma=self.gamma,
                curvature_interval=self.curvature_interval,
            ).items()
        )
        return f"{type(self).__name__}({parts})"

