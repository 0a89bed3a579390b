"""nn.Conv2d under the name ``"conv2d"`` (and class name ``Conv2dAdapter``).

The statistics are :class:`~curvlab.plugins.adapters.convolution.ConvolutionAdapter`'s, which
handles every spatial rank. This subclass restricts it to ``nn.Conv2d`` and keeps the name that
configs (``optimizer.adapters = ["linear", "conv2d", ...]``) and checkpoints written before
Conv1d/Conv3d support use: a checkpoint's ``layers_description`` records the adapter's class
name, so the default adapter list tries ``"conv2d"`` before ``"conv"`` and a Conv2d layer is
still described as ``Conv2dAdapter``.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvlab.plugins.adapters.convolution import (
    ConvolutionAdapter,
    explicit_padding,
    pad_like_module,
    window_selection,
)
from curvlab.registry import register

__all__ = ["Conv2dAdapter", "batched", "explicit_padding", "pad_like_module", "window_selection"]


def batched(x: Tensor) -> Tensor:
    """``x`` with a batch dimension (Conv2d also accepts unbatched ``(C, H, W)``)."""
    return x if x.dim() == 4 else x.unsqueeze(0)


@register("adapters", "conv2d")
class Conv2dAdapter(ConvolutionAdapter):
    """:class:`ConvolutionAdapter` for ``nn.Conv2d`` only (see the module docstring)."""

    module_types = (nn.Conv2d,)
