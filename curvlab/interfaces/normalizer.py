"""Normalizer: rescales a factor before the Kronecker product (min-max, identity, trace)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvlab.transfer import to_device_async


@dataclass(frozen=True, eq=False)
class Segments:
    """Consecutive factors packed in one flat vector: ``sizes[k]`` entries for factor ``k``;
    ``ids[j]`` is the factor of entry ``j`` (a long tensor on the vector's device)."""

    sizes: tuple[int, ...]
    ids: Tensor

    @property
    def count(self) -> int:
        return len(self.sizes)

    @classmethod
    def of(cls, sizes: tuple[int, ...], device: torch.device) -> Segments:
        # built on the host (numpy): the layout is known there, no device op is needed
        ids = to_device_async(torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)), device)
        return cls(tuple(sizes), ids)


class Normalizer(ABC):
    """An affine map of a factor, ``M' = a (M − b I)``, given by its action on ``values``:

    * ``structure="diagonal"``: ``values`` are the entries of a diagonal factor;
    * ``structure="spectrum"``: ``values`` are the eigenvalues of a banded/full factor (an
      affine map in ``I`` keeps the eigenvectors, so normalising the spectrum is exact).

    For a diagonal matrix both agree, which is why ``banded(0)`` equals ``diagonal``.

    The core keeps every diagonal factor of a model in one flat vector and calls
    :meth:`normalize_segments` once per step; override it with a vectorised version (see
    ``minmax``) to turn one call per factor into a few ops for the whole model.
    """

    @abstractmethod
    def __call__(self, values: Tensor, structure: str = "diagonal") -> Tensor: ...

    def normalize_segments(self, flat: Tensor, segments: Segments) -> Tensor:
        """Each diagonal factor packed in ``flat`` normalised on its own (a new vector).
        Default: one :meth:`__call__` per factor."""
        parts = flat.split(segments.sizes)
        return torch.cat([self(part, "diagonal") for part in parts])

    def normalize_matrix(self, matrix: Tensor) -> Tensor | None:
        """The normalised banded/full factor computed from the (groups, d, d) matrix itself,
        for maps that need no eigenvalues (identity, trace): then K-FAC's inverse solve needs
        no eigendecomposition. None (the default): the core normalises the spectrum."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
