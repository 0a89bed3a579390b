"""DampingPolicy: the Tikhonov term λ of a step."""

from __future__ import annotations

from abc import ABC, abstractmethod


class DampingPolicy(ABC):
    """Gives λ for a step. ``mode`` says where it enters:

    * ``"after_product"``: ``F = H' ⊗ S' + λ`` (AdaFisher; every entry, bias column included);
    * ``"factored"``: ``(H' + π√λ)(S' + √λ/π)`` (K-FAC, Martens & Grosse 2015).
    """

    mode: str = "after_product"

    @abstractmethod
    def value(self, step: int) -> float:
        """λ at optimizer step ``step`` (0-based count of ``step()`` calls)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
