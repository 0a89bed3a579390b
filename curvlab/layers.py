"""Pairing of parameters with layers (by identity) and per-step statistic accumulation."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic
from curvlab.regions import check_regions


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

    def __deepcopy__(self, memo: dict) -> LayerRecord:
        return self  # see CaptureEngine.__deepcopy__: a copied model's hooks stay inert

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
    """A trainable parameter that gets identity curvature, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.name} {list(self.shape)}: {self.reason}"


def pair_parameters(
    model: nn.Module, adapters: list[LayerAdapter], trainable: list[nn.Parameter]
) -> tuple[list[LayerRecord], list[FallbackParameter]]:
    """Match each module with the first adapter that handles it and pair parameters by identity.

    Rules (docs/architecture.md, "Parameter pairing"):
    * a module's own parameters that its adapter claims get that layer's curvature;
    * a parameter used by several supported modules (tied weights) gets the sum of their
      curvatures; a module reused in several places contributes every call;
    * a layer is hooked only if at least one of its parameters is being optimized;
    * an adapter that describes a module as several Kronecker blocks (``LayerAdapter.blocks``)
      gives one layer per block, named ``"<module>.<block>"``; a block may own rows of a packed
      parameter (``LayerAdapter.regions``);
    * every other trainable parameter (unsupported module, root parameter, parameter the
      adapter does not claim) falls back to identity curvature and is reported.
    """
    trainable_ids = {id(p) for p in trainable}
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)

    layers: list[LayerRecord] = []
    claimed: set[int] = set()
    reasons: dict[int, str] = {}
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        adapter = next((a for a in adapters if a.matches(module)), None)
        if adapter is None:
            for p in own.values():
                reasons.setdefault(id(p), f"no adapter for {type(module).__name__}")
            continue
        role_ids: set[int] = set()
        records = []
        for block, block_adapter in adapter.blocks(module).items():
            roles = block_adapter.parameters(module)
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
