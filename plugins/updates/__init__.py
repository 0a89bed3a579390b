"""Update rules: turn gradients and the preconditioner into parameter updates."""

from curvlab.plugins.updates import adafisher, kfac

__all__ = ["adafisher", "kfac"]
