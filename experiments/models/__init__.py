"""Models written here (no torchvision)."""

from curvlab.experiments.models.small import MLP, DigitsCNN, digits_cnn, mlp

__all__ = ["MLP", "DigitsCNN", "digits_cnn", "mlp"]
