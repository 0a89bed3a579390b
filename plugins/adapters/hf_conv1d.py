"""transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored (in, out).

transformers is never imported here: its class is looked up in ``sys.modules`` when a module is
matched, and a model that contains a ``Conv1D`` has imported it already.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from curvlab.plugins.adapters.linear import LinearAdapter
from curvlab.registry import register

#: where transformers defines the class
CONV1D_MODULE, CONV1D_NAME = "transformers.pytorch_utils", "Conv1D"


def conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers has been imported, else None."""
    return getattr(sys.modules.get(CONV1D_MODULE), CONV1D_NAME, None)


@register("adapters", "hf_conv1d")
class HFConv1DAdapter(LinearAdapter):
    r"""``y = x W + b`` with ``W`` stored as (in, out) (``torch.addmm(b, x, W)``): an
    ``nn.Linear`` with weight ``Wᵀ``. ā = [x, 1] (1 only with a bias), g = ∂L/∂y, rows = every
    leading dim, as for Linear::

        H = Σ_rows ā² / R  (bias entry 1),   S = Σ_rows g² / R
        F_W[i, o] = H[i] S[o]     (the transpose of Linear's S[o] H[i] layout)
        F_b[o]    = S[o] H[-1]

    For the full / banded estimators the (out, in+1) matrix view on which ``G ⊗ A`` acts is
    ``[Wᵀ, b]``. Without transformers installed (or imported) it matches nothing.
    """

    @property
    def module_types(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        cls = conv1d_class()
        return () if cls is None else (cls,)

    def input_signature(self, module: nn.Module) -> tuple:
        return ("hf_conv1d", module.bias is not None)

    def curvature_terms(
        self, module: nn.Module, H: Tensor, S: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        n_in = module.weight.shape[0]
        out: dict[str, tuple[Tensor, Tensor | None]] = {"weight": (H[:n_in, None], S[None, :])}
        if module.bias is not None:
            out["bias"] = (S, H[n_in:])
        return out

    def to_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        weight = tensors.get("weight")
        if weight is None:
            weight = torch.zeros_like(module.weight)
        matrix = weight.t()  # (out, in)
        if module.bias is not None:
            bias = tensors.get("bias")
            if bias is None:
                bias = matrix.new_zeros(matrix.shape[0])
            matrix = torch.cat([matrix, bias.reshape(-1, 1).to(matrix.dtype)], dim=1)
        return matrix[None]

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
        n_in = module.weight.shape[0]
        matrix = matrix.reshape(module.weight.shape[1], -1)
        result = {"weight": matrix[:, :n_in].t()}
        if module.bias is not None:
            result["bias"] = matrix[:, n_in]
        return result
