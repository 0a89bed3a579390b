"""Fallback rules: the curvature of parameters that no layer adapter covers."""

from curvlab.plugins.fallbacks import error, identity, squared_gradient

__all__ = ["error", "identity", "squared_gradient"]
