"""Datasets. Embedded real data (scikit-learn digits, iris) needs no download."""

from curvlab.experiments.data.embedded import Split, digits, iris

__all__ = ["Split", "digits", "iris"]
