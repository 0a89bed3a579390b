"""Banded Kronecker factors: the entries |i − j| ≤ b of A and G ("banded AdaFisher")."""

from __future__ import annotations

from torch import Tensor

from curvlab.interfaces.adapter import LayerAdapter
from curvlab.plugins.estimators.full import KroneckerRowsEstimator
from curvlab.registry import register
from curvlab.structures import band_to_dense  # noqa: F401 - re-exported for users
from curvlab.validation import check_range


def band_of_rows(rows: Tensor, bandwidth: int) -> Tensor:
    """Σ_r rows[:, r, i] rows[:, r, i+k] for k = 0..b as (groups, b+1, d), zero-padded at the
    end: O(R·d·b) work, the full d×d factor is never formed."""
    groups, _, d = rows.shape
    b = min(bandwidth, d - 1)
    band = rows.new_zeros(groups, b + 1, d)
    for k in range(b + 1):
        band[:, k, : d - k] = (rows[:, :, : d - k] * rows[:, :, k:]).sum(1)
    return band


@register("estimators", "banded")
class BandedEstimator(KroneckerRowsEstimator):
    r"""Keeps the entries with ``|i − j| ≤ b`` of each Kronecker factor (SPEC §3, the thesis's
    first future direction). ``b = 0`` is *the* diagonal estimator (same statistics, same
    preconditioner); ``b ≥ d − 1`` is the full factor.

    Preconditioning (``solver``): by default ``"block"``, the exact Kronecker + λI solve for
    the factors' diagonal ``block_size × block_size`` blocks (the band entries coupling two
    blocks are dropped; a factor of dimension ≤ ``block_size`` is exact), which costs
    O(out·in·block_size) per layer and step, less than K-FAC's two dense products;
    ``"auto"`` / ``"eigen"`` is the exact solve in each whole factor's eigenbasis
    (:mod:`curvlab.kronecker_block`, docs/math.md).
    """

    def __init__(
        self,
        bandwidth: int = 8,
        per_sample: bool = False,
        solver: str = "block",
        block_size: int = 64,
    ) -> None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
            raise ValueError(f"bandwidth must be an integer >= 0, got {bandwidth!r}")
        check_range("bandwidth", bandwidth, 0)
        super().__init__(per_sample=per_sample, solver=solver, block_size=block_size)
        self.bandwidth = bandwidth

    @property
    def structure(self) -> str:  # type: ignore[override]
        return "diagonal" if self.bandwidth == 0 else "banded"

    def layer_structure(self, adapter: LayerAdapter) -> str:
        if self.bandwidth == 0:  # the diagonal estimator's statistics, by inheritance
            return "diagonal"
        return super().layer_structure(adapter)

    def second_moment(self, rows: Tensor) -> Tensor:
        return band_of_rows(rows, self.bandwidth)

    def __repr__(self) -> str:
        block = f", block_size={self.block_size}" if self.solver == "block" else ""
        return (
            f"BandedEstimator(bandwidth={self.bandwidth}, per_sample={self.per_sample}, "
            f"solver={self.solver!r}{block})"
        )
