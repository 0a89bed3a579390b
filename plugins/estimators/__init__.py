"""Factor estimators: the structure of the raw factors."""

from curvlab.plugins.estimators import diagonal

__all__ = ["diagonal"]
