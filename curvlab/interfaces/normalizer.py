"""Normalizer: maps a factor to a normalised factor (min-max for AdaFisher, identity for K-FAC)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Normalizer(ABC):
    """``factor ↦ normalised factor`` for one structure ("diagonal", "banded", "full")."""

    @abstractmethod
    def __call__(self, factor: Tensor, structure: str = "diagonal") -> Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
