"""Reducers: combine factor statistics across data-parallel ranks."""

from curvlab.plugins.reducers import none, torch_distributed

__all__ = ["none", "torch_distributed"]
