"""curvlab: Kronecker-factored Fisher curvature and the optimizers built on it.

>>> import curvlab
>>> opt = curvlab.AdaFisher(model, lr=1e-3)                       # doctest: +SKIP
>>> opt = curvlab.build_optimizer(model, "configs/adafisher.gin")  # doctest: +SKIP
>>> print(opt.coverage())                                         # doctest: +SKIP
"""

from curvlab.config import build_optimizer, make_optimizer
from curvlab.coverage import Coverage
from curvlab.layers import (
    FallbackParameter,
    register_layer,
    registered_layers,
    unregister_layer,
)
from curvlab.lifecycle import OptimizerReplacedWarning
from curvlab.optimizer import CurvatureFallbackWarning, CurvatureOptimizer
from curvlab.presets import AdaFisher, AdaFisherW
from curvlab.registry import register, registered

__version__ = "0.1.0"

__all__ = [
    "AdaFisher",
    "AdaFisherW",
    "Coverage",
    "CurvatureFallbackWarning",
    "CurvatureOptimizer",
    "FallbackParameter",
    "OptimizerReplacedWarning",
    "build_optimizer",
    "make_optimizer",
    "register",
    "register_layer",
    "registered",
    "registered_layers",
    "unregister_layer",
]
