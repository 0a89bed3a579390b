"""Pairing of parameters with layers (by identity) and per-step statistic accumulation."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from curvlab.interfaces.adapter import LayerAdapter, Statistic


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
        _check_regions(adapter, module_name, records, trainable_ids)
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


def _check_regions(
    adapter: LayerAdapter, module_name: str, records: list[LayerRecord], trainable: set[int]
) -> None:
    """The blocks of one module must cover every row of each trainable parameter they split
    into regions, without overlap (uncovered rows would get neither curvature nor fallback)."""
    rows: dict[int, tuple[nn.Parameter, str, list[tuple[int, int]]]] = {}
    for record in records:
        for role, region in record.regions.items():
            p = record.params[role]
            start, stop, step = region.indices(p.shape[0])
            if step != 1:
                raise ValueError(
                    f"{type(adapter).__name__}: region {region} of {role!r} must be contiguous rows"
                )
            rows.setdefault(id(p), (p, role, []))[2].append((start, stop))
    for key, (p, role, spans) in rows.items():
        if key not in trainable:
            continue
        spans = sorted(spans)
        covered = 0
        for start, stop in spans:
            if start != covered:
                break
            covered = stop
        if covered != p.shape[0] or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise ValueError(
                f"{type(adapter).__name__}: the blocks of {module_name or '<root>'!r} cover rows "
                f"{spans} of its {role!r} parameter of {p.shape[0]} rows; the blocks of a packed "
                f"parameter must cover every row exactly once"
            )


def shared_parameters(layers: list[LayerRecord]) -> set[int]:
    """Ids of the parameters that get the *diagonal* of their layers' factors, summed.

    A parameter is shared when several layers use overlapping rows of it (tied weights: a GPT
    head tied to the token embedding), or when the blocks that split it into row regions have
    different structures (one joint eigenbasis solve per block cannot cover it). Blocks of one
    packed parameter with disjoint regions and the same structure (attention's q, k, v rows of
    ``in_proj_weight``) are not shared: each is solved in its own eigenbasis.
    """
    uses: dict[int, list[tuple[tuple[int, int] | None, str]]] = {}
    for record in layers:
        for role, p in record.params.items():
            region = record.regions.get(role)
            span = None if region is None else region.indices(p.shape[0])[:2]
            uses.setdefault(id(p), []).append((span, record.structure))
    shared = set()
    for key, spans in uses.items():
        if len(spans) == 1:
            continue
        regions = sorted(s for s, _ in spans if s is not None)
        disjoint = len(regions) == len(spans) and all(
            a[1] <= b[0] for a, b in zip(regions, regions[1:])
        )
        if not disjoint or len({structure for _, structure in spans}) > 1:
            shared.add(key)
    return shared
