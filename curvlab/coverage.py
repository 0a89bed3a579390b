"""Which trainable parameters get layer curvature, and which get the fallback rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerCoverage:
    """A paired layer: its module class, the adapter that reads it and its trainable elements."""

    name: str
    module_type: str
    adapter: str
    elements: int


@dataclass(frozen=True)
class FallbackCoverage:
    """A trainable parameter without layer curvature, the rule it gets, and why."""

    name: str
    shape: tuple[int, ...]
    elements: int
    rule: str
    reason: str


@dataclass(frozen=True)
class Coverage:
    """``optimizer.coverage()``: per layer and per fallback parameter, the adapter or fallback
    rule and the number of elements; ``share`` is the fraction of trainable elements (each
    tensor counted once, tied weights included) that get layer curvature.

    ``str(coverage)`` is a one-line summary; ``as_dict()`` is JSON-ready.
    """

    layers: tuple[LayerCoverage, ...]
    fallback: tuple[FallbackCoverage, ...]
    covered_elements: int
    total_elements: int
    fallback_rule: str
    #: an elementwise estimator's name: then every parameter has its own curvature, no layers
    elementwise: str | None = None

    @property
    def share(self) -> float:
        return self.covered_elements / self.total_elements if self.total_elements else 1.0

    def by_adapter(self) -> dict[str, int]:
        """Layers per adapter name, in order of first appearance."""
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.adapter] = out.get(layer.adapter, 0) + 1
        return out

    def __str__(self) -> str:
        head = (
            f"curvature coverage {percent(self.share)} "
            f"({self.covered_elements:,} of {self.total_elements:,} trainable elements)"
        )
        if self.elementwise is not None:
            return f"{head}: elementwise estimator {self.elementwise!r}, every parameter its own"
        adapters = ", ".join(f"{name} {n}" for name, n in self.by_adapter().items())
        text = f"{head}: {_count(len(self.layers), 'layer')} ({adapters or 'none'})"
        if self.fallback:
            kinds = sorted({f.reason for f in self.fallback})
            uncovered = sum(f.elements for f in self.fallback)
            text += (
                f"; fallback {self.fallback_rule!r} for {_count(len(self.fallback), 'parameter')} "
                f"({uncovered:,} elements: {'; '.join(kinds)})"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["share"] = self.share
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def percent(share: float) -> str:
    """Two decimals; a partial coverage never shows as 100.00% (nor a non-zero one as 0.00%)."""
    text = f"{100.0 * share:.2f}%"
    if share < 1.0 and text == "100.00%":
        return "99.99%"
    if share > 0.0 and text == "0.00%":
        return "0.01%"
    return text
