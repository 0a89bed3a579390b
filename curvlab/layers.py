"""Pairing of parameters with layers (by identity), the layer-class mappings of
:func:`register_layer`, and per-step statistic accumulation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from curvlab import registry
from curvlab.interfaces.adapter import LayerAdapter, Statistic
from curvlab.naming import canonical_named_modules, canonical_parameter_names
from curvlab.regions import check_regions
from curvlab.sharding import original_class


@dataclass(eq=False)
class LayerRecord:
    """One supported module, its adapter, the parameters it owns, and this step's statistics.

    Statistics of every captured call (forward with grad enabled in training mode, whose output
    gradient then arrived) are *summed* with their row counts, so several backward passes per
    ``step()`` (gradient accumulation, a module reused twice) average over all their rows.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    params: dict[str, nn.Parameter]
    #: "diagonal", "banded" or "full": the estimator's structure for this layer
    structure: str = "diagonal"
    #: the Kronecker block of ``module`` this record holds (``LayerAdapter.blocks``; "" = whole)
    block: str = ""
    #: role → rows of the parameter this block covers (``LayerAdapter.regions``; absent = whole)
    regions: dict[str, slice] = field(default_factory=dict)
    #: True once any statistic was captured for this layer
    captured: bool = False
    input_total: Tensor | None = field(default=None, repr=False)
    input_count: int = 0
    output_total: Tensor | None = field(default=None, repr=False)
    output_count: int = 0
    #: captured forwards whose output gradient has not arrived yet (the capture engine counts
    #: them), so a listener can tell when this backward has no more statistics for the layer
    pending: int = field(default=0, repr=False)
    #: called by the capture engine after each ``accumulate`` during backward (e.g. a reducer
    #: that launches the all-reduce of finished layers while the backward pass goes on)
    on_statistics: Callable[[LayerRecord], None] | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict) -> LayerRecord:
        return self  # see CaptureEngine.__deepcopy__: a copied model's hooks stay inert

    def __getstate__(self) -> dict:
        # a pickled hooked model pickles its records; the listener (a reducer holding a
        # process group) is not part of the model
        state = self.__dict__.copy()
        state["on_statistics"] = None
        return state

    def accumulate(self, input_stat: Statistic, output_stat: Statistic) -> None:
        if self.input_total is None:
            self.input_total, self.input_count = input_stat.total, input_stat.count
            self.output_total, self.output_count = output_stat.total, output_stat.count
        else:
            self.input_total = self.input_total + input_stat.total
            self.input_count += input_stat.count
            self.output_total = self.output_total + output_stat.total
            self.output_count += output_stat.count
        self.captured = True

    @property
    def has_statistics(self) -> bool:
        return self.input_total is not None

    def take(self) -> tuple[Statistic, Statistic]:
        """This step's (input, output) statistics; clears them."""
        out = (
            Statistic(self.input_total, self.input_count),
            Statistic(self.output_total, self.output_count),
        )
        self.clear()
        return out

    def clear(self) -> None:
        self.input_total = self.output_total = None
        self.input_count = self.output_count = 0


@dataclass(frozen=True)
class FallbackParameter:
    """A trainable parameter without layer curvature (the fallback rule applies), and why."""

    name: str
    shape: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.name} {list(self.shape)}: {self.reason}"


# -- register_layer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerMapping:
    """``register_layer(target, adapter_name, **options)``: modules whose class is ``target``
    (or derives from it) are read by ``adapter`` (the adapter ``adapter_name`` built with
    ``options``)."""

    target: str  # the class's qualified name, "module.Class"
    adapter_name: str
    options: dict[str, Any]
    adapter: LayerAdapter

    def __str__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.target} -> {self.adapter_name!r}{opts}"


_MAPPINGS: dict[str, LayerMapping] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _target_name(module_class: type | str) -> str:
    if isinstance(module_class, str):
        if "." not in module_class or module_class.startswith(".") or module_class.endswith("."):
            raise ValueError(
                f"register_layer: {module_class!r} is not a class nor a qualified class name "
                f"such as 'transformers.models.llama.modeling_llama.LlamaRMSNorm'"
            )
        return module_class
    if isinstance(module_class, type) and issubclass(module_class, nn.Module):
        return qualified_name(module_class)
    raise TypeError(
        f"register_layer: module_class must be an nn.Module subclass or its qualified name "
        f"('package.module.Class'), got {module_class!r}"
    )


def register_layer(module_class: type[nn.Module] | str, adapter_name: str, **options: Any) -> None:
    """Read modules of ``module_class`` (and its subclasses) with the adapter ``adapter_name``.

    ``options`` are the adapter's constructor arguments: they say how to read the module, e.g.
    ``register_layer(LlamaRMSNorm, "rmsnorm", eps="variance_epsilon")`` (the attribute that
    holds ε). ``module_class`` may be given as its qualified name
    (``"transformers.models.llama.modeling_llama.LlamaRMSNorm"``): it is compared with the
    classes of the model's modules and never imported.

    A mapping is used by every optimizer whose ``adapters`` include ``adapter_name`` (so an
    ablation that drops an adapter drops its mapped classes too, and the official variant keeps
    its four layer types); it takes precedence over the adapters' own ``isinstance`` matching.
    Registering a class again replaces its mapping. An unknown adapter name or a bad option
    raises ``ValueError`` naming the valid ones. See docs/layers.md.
    """
    target = _target_name(module_class)
    cls = registry.lookup("adapters", adapter_name)  # unknown names list the registered ones
    try:
        adapter = cls(**options)
    except (TypeError, ValueError) as err:
        import inspect

        valid = [
            name
            for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ValueError(
            f"register_layer({target.rsplit('.', 1)[-1]}, {adapter_name!r}): bad options "
            f"{sorted(options)} ({err}); options of {adapter_name!r}: "
            f"{', '.join(valid) or 'none'}"
        ) from None
    _MAPPINGS[target] = LayerMapping(target, adapter_name, dict(options), adapter)


def unregister_layer(module_class: type[nn.Module] | str) -> None:
    """Remove the mapping of ``module_class`` (a ``KeyError`` if there is none)."""
    target = _target_name(module_class)
    if target not in _MAPPINGS:
        raise KeyError(f"unregister_layer: no mapping for {target!r}")
    del _MAPPINGS[target]


def registered_layers() -> dict[str, LayerMapping]:
    """The current mappings, by qualified class name (built-in ones included)."""
    registry.load_builtin_plugins()
    return dict(_MAPPINGS)


def find_mapping(module: nn.Module) -> LayerMapping | None:
    """The mapping of the nearest class in ``type(module)``'s MRO that has one."""
    if not _MAPPINGS:
        return None
    for cls in type(module).__mro__:
        mapping = _MAPPINGS.get(qualified_name(cls))
        if mapping is not None:
            return mapping
    return None


def adapter_name(adapter: LayerAdapter) -> str:
    """The registered name of an adapter (its class name for an unregistered one)."""
    return getattr(type(adapter), "plugin_name", None) or type(adapter).__name__


# -- pairing --------------------------------------------------------------------------------------
def select_adapter(
    module: nn.Module, adapters: Sequence[LayerAdapter]
) -> tuple[LayerAdapter | None, str | None]:
    """The adapter that reads ``module`` (a mapping whose adapter is among ``adapters``, else
    the first adapter that matches), or None with the reason."""
    mapping = find_mapping(module)
    if mapping is not None:
        active = {getattr(type(a), "plugin_name", None) for a in adapters}
        if mapping.adapter_name in active:
            return mapping.adapter, None
        if not any(a.matches(module) for a in adapters):
            return None, (
                f"no adapter for {original_class(module).__name__} among this optimizer's "
                f"adapters (it is mapped to {mapping.adapter_name!r} by register_layer)"
            )
    adapter = next((a for a in adapters if a.matches(module)), None)
    if adapter is None:
        return None, f"no adapter for {original_class(module).__name__}"
    return adapter, None


def pair_parameters(
    model: nn.Module, adapters: list[LayerAdapter], trainable: list[nn.Parameter]
) -> tuple[list[LayerRecord], list[FallbackParameter]]:
    """Match each module with its adapter and pair parameters by identity.

    Rules (docs/architecture.md, "Parameter pairing"):
    * a module whose class (or a base class) is mapped by :func:`register_layer` onto one of
      ``adapters`` uses that mapping; otherwise the first adapter whose ``matches`` is true;
    * a module's own parameters that its adapter claims get that layer's curvature;
    * a parameter used by several supported modules (tied weights) gets the sum of their
      curvatures; a module reused in several places contributes every call;
    * a layer is hooked only if at least one of its parameters is being optimized;
    * an adapter that describes a module as several Kronecker blocks (``LayerAdapter.blocks``)
      gives one layer per block, named ``"<module>.<block>"``; a block may own rows of a packed
      parameter (``LayerAdapter.regions``);
    * every other trainable parameter (unsupported module, root parameter, parameter the
      adapter does not claim) gets the fallback rule and is reported.

    Layer and parameter names are canonical (:mod:`curvlab.naming`): the same for a model and
    its ``torch.compile`` / DDP / FSDP / checkpoint-wrapped forms.
    """
    trainable_ids = {id(p) for p in trainable}
    names = canonical_parameter_names(model)

    layers: list[LayerRecord] = []
    claimed: set[int] = set()
    reasons: dict[int, str] = {}
    for module_name, module in canonical_named_modules(model):
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        adapter, why = select_adapter(module, adapters)
        if adapter is None:
            for p in own.values():
                reasons.setdefault(id(p), why)
            continue
        role_ids: set[int] = set()
        records = []
        for block, block_adapter in adapter.blocks(module).items():
            try:
                roles = block_adapter.parameters(module)
            except (AttributeError, ValueError) as err:  # a mapping's options do not fit
                raise ValueError(
                    f"layer {module_name or '<root>'!r} ({type(module).__name__}): {err}"
                ) from None
            role_ids.update(id(p) for p in roles.values())
            if any(id(p) in trainable_ids for p in roles.values()):
                name = ".".join(part for part in (module_name, block) if part) or "<root>"
                regions = dict(block_adapter.regions(module))
                records.append(
                    LayerRecord(name, module, block_adapter, roles, block=block, regions=regions)
                )
                claimed.update(id(p) for p in roles.values())
        check_regions(type(adapter).__name__, module_name, records, trainable_ids)
        layers.extend(records)
        for pname, p in own.items():
            if id(p) not in role_ids:
                reasons.setdefault(
                    id(p), f"{type(adapter).__name__} does not claim parameter {pname!r}"
                )

    fallback = []
    for p in trainable:
        if id(p) in claimed:
            continue
        reason = reasons.get(id(p), "not a parameter of the model's modules")
        fallback.append(FallbackParameter(names.get(id(p), "<unnamed>"), tuple(p.shape), reason))
    return layers, fallback
