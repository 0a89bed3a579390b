"""DampingPolicy: the Tikhonov term λ of a step and where it enters."""

from __future__ import annotations

from abc import ABC, abstractmethod

#: where λ enters (p is the update rule's power, 1 for AdaFisher, 0.5 for Adam-like rules)
DAMPING_MODES = ("after_product", "after_root", "factored")


class DampingPolicy(ABC):
    """Gives λ for a step. ``mode`` says where it enters the preconditioner:

    * ``"after_product"``: ``(H' ⊗ S' + λ)^{-p}`` (AdaFisher: every entry, bias column included);
    * ``"after_root"``: ``((H' ⊗ S')^p + λ)^{-1}`` (Adam's ε after the square root);
    * ``"factored"``: ``((H' + π√λ) ⊗ (S' + √λ/π))^{-p}`` with
      ``π = sqrt((tr H'/dim H) / (tr S'/dim S))`` (Martens & Grosse 2015, Sec. 6.3).
    """

    mode: str = "after_product"

    @abstractmethod
    def value(self, step: int) -> float:
        """λ at optimizer step ``step`` (0-based count of ``step()`` calls)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"
