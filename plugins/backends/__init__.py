"""Backends: where raw factor statistics come from."""

from curvlab.plugins.backends import native

__all__ = ["native"]
