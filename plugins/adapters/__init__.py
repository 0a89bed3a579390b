"""Layer adapters: what the Kronecker rows ā and g are for each module type."""

from curvlab.plugins.adapters import conv2d, embedding, linear, normalization, official

__all__ = ["conv2d", "embedding", "linear", "normalization", "official"]
