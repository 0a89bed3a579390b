"""Layer adapters: what the Kronecker rows ā and g are for each module type."""

from curvlab.plugins.adapters import attention, conv2d, embedding, linear, normalization, official

__all__ = ["attention", "conv2d", "embedding", "linear", "normalization", "official"]
