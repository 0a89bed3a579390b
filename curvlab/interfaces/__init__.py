"""The plugin interfaces of the curvature pipeline (see docs/architecture.md).

::

    hooks ─> LayerAdapter ─> FactorEstimator ─> Reducer ─> EMA ─> Normalizer
             (a and g per     (diagonal, banded,  (ranks)          (min-max,
              layer type)      full, elementwise)                  identity, trace)
          ─> DampingPolicy ─> UpdateRule
             (Tikhonov λ)     (m/F, m/√F, K-FAC, Adam)

    parameters no adapter covers ─> FallbackPolicy (identity, squared gradient, error)
"""

from curvlab.interfaces.adapter import LayerAdapter, Statistic
from curvlab.interfaces.backend import Backend
from curvlab.interfaces.damping import DampingPolicy
from curvlab.interfaces.estimator import FactorEstimator
from curvlab.interfaces.fallback import FallbackPolicy
from curvlab.interfaces.normalizer import Normalizer
from curvlab.interfaces.reducer import Reducer
from curvlab.interfaces.update import Preconditioner, UpdateRule

__all__ = [
    "Backend",
    "DampingPolicy",
    "FactorEstimator",
    "FallbackPolicy",
    "LayerAdapter",
    "Normalizer",
    "Preconditioner",
    "Reducer",
    "Statistic",
    "UpdateRule",
]
