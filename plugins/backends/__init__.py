"""Backends: where raw factor statistics come from.

``native`` (curvlab's own hooks, the default), ``backpack`` (BackPACK extensions) and ``asdl``
(ASDL's Fisher maker). BackPACK and ASDL are imported lazily, inside the backends' methods, so
that ``import curvlab`` works without them. docs/backends.md compares the conventions.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class UnsupportedLayerError(ValueError):
    """A layer (or layer setting) that a curvature backend cannot handle.

    The message names the layer, its type and the backend, says why, and what to do instead.
    """


def layer_error(backend: str, name: str, module: nn.Module, reason: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"{backend} backend: cannot handle layer {name!r} ({type(module).__name__}): {reason}. "
        f'Use optimizer.backend = "native" (or another backend) for this model, or remove the '
        f"layer's adapter from optimizer.adapters so that its parameters get identity curvature."
    )


def find_model(is_active: Callable[[], bool], model: nn.Module | None = None) -> nn.Module | None:
    """The model whose layers a backend is attached to.

    ``Backend.attach`` receives the layers, not the model; backends that must run or extend the
    whole model (BackPACK's second-order extensions, ASDL's Fisher maker) take it from ``model``
    when given, else from the optimizer that owns ``is_active`` (a bound method of
    :class:`~curvlab.optimizer.CurvatureOptimizer`).
    """
    if model is not None:
        return model
    owner = getattr(is_active, "__self__", None)
    found = getattr(owner, "model", None)
    return found if isinstance(found, nn.Module) else None


def check_estimator(backend: str, estimator) -> None:  # noqa: ANN001
    """These backends compute the built-in diagonal and full factors themselves: any other
    estimator (a user's plugin, banded) would be silently replaced, so it is refused."""
    from curvlab.plugins.estimators.diagonal import DiagonalEstimator
    from curvlab.plugins.estimators.full import FullEstimator

    if type(estimator) not in (DiagonalEstimator, FullEstimator):
        raise NotImplementedError(
            f"{backend} backend computes the built-in 'diagonal' and 'full' factors itself and "
            f"cannot run the estimator {type(estimator).__name__}; use backend='native' for it "
            f"(or compare it with `curvlab check-curvature`)"
        )


def check_structure(backend: str, layers, supported: tuple[str, ...]) -> None:  # noqa: ANN001
    """Raise unless every layer's estimator structure is one the backend can produce."""
    for record in layers:
        structure = getattr(record, "structure", "diagonal")
        if structure not in supported:
            raise NotImplementedError(
                f"{backend} backend: layer {record.name!r} uses the {structure!r} factor "
                f"structure; "
                f"this backend produces {', '.join(repr(s) for s in supported)} factors only"
            )


from curvlab.plugins.backends import asdl, backpack, native  # noqa: E402 - helpers first

__all__ = [
    "UnsupportedLayerError",
    "asdl",
    "backpack",
    "check_estimator",
    "find_model",
    "layer_error",
    "native",
]
