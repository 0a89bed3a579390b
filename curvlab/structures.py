"""Storage of factor structures and their conversion to dense matrices."""

from __future__ import annotations

import torch
from torch import Tensor


def band_to_dense(band: Tensor) -> Tensor:
    """(groups, b+1, d) band storage (row k holds ``M[i, i+k]``) → symmetric (groups, d, d)."""
    groups, width, d = band.shape
    dense = band.new_zeros(groups, d, d)
    idx = torch.arange(d, device=band.device)
    for k in range(width):
        i = idx[: d - k]
        dense[:, i, i + k] = band[:, k, : d - k]
        if k:
            dense[:, i + k, i] = band[:, k, : d - k]
    return dense


def dense_factor(structure: str, factor: Tensor) -> Tensor:
    """A banded or full factor as (groups, d, d)."""
    if structure == "banded":
        return band_to_dense(factor)
    if structure == "full":
        return factor
    raise ValueError(f"no dense form for structure {structure!r} (expected 'banded' or 'full')")
