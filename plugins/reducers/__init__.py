"""Reducers: combine factor statistics across data-parallel ranks."""

from curvlab.plugins.reducers import none

__all__ = ["none"]
