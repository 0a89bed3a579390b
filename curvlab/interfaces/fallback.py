"""FallbackPolicy: the curvature of trainable parameters that no layer adapter covers."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from curvlab.interfaces.normalizer import Normalizer

if TYPE_CHECKING:  # pragma: no cover
    from curvlab.layers import FallbackParameter


class FallbackPolicy(ABC):  # noqa: B024 - every method has a default (the identity rule)
    r"""What preconditions a trainable parameter that has no layer curvature.

    Such parameters are the ones :func:`curvlab.layers.pair_parameters` leaves without a layer
    (an ``nn.LSTM``'s weights, a raw ``nn.Parameter`` such as a class token or a position table,
    a weight used by a functional op) and those of paired layers that were never captured. The
    optimizer talks to the policy through three calls:

    * :meth:`check` — when such parameters are found (at pairing; for never-captured layers at
      the first curvature step that captured any layer). It may refuse them (``error``).
    * :meth:`update` — on every curvature step, with the parameters' gradients, their
      per-parameter state (``optimizer.state[p]``, so it is saved and loaded with the
      optimizer) and the step's on-device finite flag ``ok``: when ``ok`` is False the state
      must stay exactly as it was (blend with ``torch.where``; never branch on ``ok`` in Python).
    * :meth:`curvature` — the parameter's *undamped* curvature, normalised, shaped like the
      parameter; the preconditioner adds λ as it does for the layers' factors (``F + λ`` for
      AdaFisher). ``None`` means "no curvature of its own": the constant
      ``F = 1 + λ`` (``damp_fallback=True``, the paper's identity) or ``F = 1`` (official code).

    The defaults of all three are the identity rule.
    """

    def check(self, parameters: Sequence[FallbackParameter]) -> None:
        """Accept (return) or refuse (raise ``ValueError``) these parameters."""
        return None

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[dict[str, Tensor]],
        ok: Tensor,
        gamma: float,
    ) -> None:
        """Fold this curvature step's statistics into ``states`` (γ: the optimizer's EMA decay)."""
        return None

    def curvature(
        self, param: Tensor, state: dict[str, Tensor], normalizer: Normalizer
    ) -> Tensor | None:
        """The undamped curvature of ``param`` (its shape), or None for the constant."""
        return None

    def describe(self, constant: str) -> str:
        """What the parameters get, in one sentence (``constant``: ``"1 + λ"`` or ``"1"``)."""
        return f"F = {constant}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
