"""Built-in plugins, one folder per interface. Importing this package registers them all."""

from curvlab.plugins import (
    adapters,
    backends,
    damping,
    estimators,
    fallbacks,
    normalizers,
    reducers,
    updates,
)

__all__ = [
    "adapters",
    "backends",
    "damping",
    "estimators",
    "fallbacks",
    "normalizers",
    "reducers",
    "updates",
]
