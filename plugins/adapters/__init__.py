"""Layer adapters: what the Kronecker rows ā and g are for each module type."""

from curvlab.plugins.adapters import (
    attention,
    conv2d,
    conv_transpose,
    convolution,
    embedding,
    hf_conv1d,
    hf_rmsnorm,
    linear,
    normalization,
    official,
)

__all__ = [
    "attention",
    "conv2d",
    "conv_transpose",
    "convolution",
    "embedding",
    "hf_conv1d",
    "hf_rmsnorm",
    "linear",
    "normalization",
    "official",
]
