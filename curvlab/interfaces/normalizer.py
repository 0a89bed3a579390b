"""Normalizer: rescales a factor before the Kronecker product (min-max, identity, trace)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Normalizer(ABC):
    """An affine map of a factor, ``M' = a (M − b I)``, given by its action on ``values``:

    * ``structure="diagonal"``: ``values`` are the entries of a diagonal factor;
    * ``structure="spectrum"``: ``values`` are the eigenvalues of a banded/full factor (an
      affine map in ``I`` keeps the eigenvectors, so normalising the spectrum is exact).

    For a diagonal matrix both agree, which is why ``banded(0)`` equals ``diagonal``.
    """

    @abstractmethod
    def __call__(self, values: Tensor, structure: str = "diagonal") -> Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
