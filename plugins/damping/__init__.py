"""Damping policies: the Tikhonov term λ."""

from curvlab.plugins.damping import constant

__all__ = ["constant"]
