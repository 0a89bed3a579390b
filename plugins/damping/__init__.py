"""Damping policies: the Tikhonov term λ."""

from curvlab.plugins.damping import constant, schedule

__all__ = ["constant", "schedule"]
