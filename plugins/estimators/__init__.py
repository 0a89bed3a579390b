"""Factor estimators: the structure of the raw factors."""

from curvlab.plugins.estimators import banded, diagonal, full, squared_gradient

__all__ = ["banded", "diagonal", "full", "squared_gradient"]
