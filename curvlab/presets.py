"""AdaFisher and AdaFisherW: the pipeline with the paper's (or the official code's) parts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from curvlab.optimizer import PAPER_ADAPTERS, CurvatureOptimizer
from curvlab.registry import create
from curvlab.validation import check_choice

VARIANTS = ("paper", "official")
OFFICIAL_ADAPTERS = (
    "official_linear",
    "official_conv2d",
    "official_batchnorm2d",
    "official_layernorm",
)
#: curvature interval when none is given: every step (paper), TCov = 100 (official code)
DEFAULT_INTERVAL = {"paper": 1, "official": 100}


def variant_parts(variant: str) -> dict[str, Any]:
    """The plugin choices that define a variant (also spelled out in configs/*.gin)."""
    check_choice("variant", variant, VARIANTS)
    if variant == "paper":
        return dict(adapters=PAPER_ADAPTERS, normalizer="minmax", ema="paper", damp_fallback=True)
    return dict(
        adapters=OFFICIAL_ADAPTERS,
        normalizer=create("normalizers", "minmax", map_infinities=True),
        ema="official",
        damp_fallback=False,
    )


class AdaFisher(CurvatureOptimizer):
    r"""AdaFisher (Gomes et al., ICLR 2025): diagonal Kronecker-factored empirical Fisher,
    min-max normalised, damped, preconditioning bias-corrected momentum (no square root)::

        H ← γ H + (1−γ) Ĥ ,  S ← γ S + (1−γ) Ŝ
        F = minmax(S) ⊗ minmax(H) + λ
        m ← β m + (1−β)(g + κθ) ,  θ ← θ − α · m / (1−β^t) / F

    ``variant="official"`` reproduces the published code's arithmetic (SPEC §3): min-max before
    an EMA ``H ← 0.1γ H + 0.01γ minmax(Ĥ)`` started from ones, its own layer statistics, F = 1
    for unsupported parameters, curvature every 100 steps unless ``curvature_interval`` is given.

    Args:
        model: the network (its layers are hooked).
        lr: α. beta: β. gamma: γ. damping: λ > 0. weight_decay: κ.
        curvature_interval: capture and fold in statistics every k steps.
        variant: ``"paper"`` or ``"official"``.
        params: parameters or param groups (default: the model's trainable parameters).
        **parts: any other :class:`CurvatureOptimizer` argument (plugins, ema, ...), e.g.
            ``fallback="squared_gradient"`` for the parameters that no layer adapter covers
            (default ``"identity"``: ``F = 1 + λ``, official ``F = 1``; docs/layers.md).
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        gamma: float = 0.8,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        curvature_interval: int | None = None,
        variant: str = "paper",
        params: Iterable[Any] | None = None,
        **parts: Any,
    ) -> None:
        self.variant = check_choice("variant", variant, VARIANTS)
        config = variant_parts(variant)
        config.update(parts)
        config.setdefault(
            "update_rule", "adafisherw" if self.decoupled_weight_decay else "adafisher"
        )
        if curvature_interval is None:
            curvature_interval = DEFAULT_INTERVAL[variant]
        super().__init__(
            model,
            params,
            lr=lr,
            beta=beta,
            gamma=gamma,
            damping=damping,
            weight_decay=weight_decay,
            curvature_interval=curvature_interval,
            **config,
        )


class AdaFisherW(AdaFisher):
    r"""AdaFisher with decoupled weight decay: ``θ ← θ − α (m̂ / F + κ θ)``."""

    decoupled_weight_decay = True
