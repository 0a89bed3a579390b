"""Normalizers: how factors are rescaled before the Kronecker product."""

from curvlab.plugins.normalizers import identity, minmax, trace

__all__ = ["identity", "minmax", "trace"]
