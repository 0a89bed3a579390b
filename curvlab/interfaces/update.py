"""UpdateRule: consumes gradients and a preconditioner, owns its own state (momentum, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor


class Preconditioner(ABC):
    """The curvature of the current step, for the parameters of one param group."""

    @abstractmethod
    def solve(
        self, params: list[Tensor], tensors: list[Tensor], power: float = 1.0
    ) -> list[Tensor]:
        """``F^{-power} v`` for each ``(param, v)`` pair (new tensors)."""

    @abstractmethod
    def dense_diagonal(self, param: Tensor) -> Tensor:
        """The diagonal of ``F`` for ``param`` (damping included), shaped like the parameter."""


#: one param group's share of a step: (group dict, params with grads, their grads, their states)
GroupWork = tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict[str, Tensor]]]


class UpdateRule(ABC):
    """One step of all param groups: ``update(work, precond, ok)``.

    All groups come in one call so that a layer whose weight and bias sit in different groups
    is still preconditioned jointly (one ``precond.solve`` over every parameter).

    ``ok`` is a 0-dim bool tensor (on the parameters' device): when False the step must leave
    parameters and state unchanged; rules blend with it instead of branching in Python.
    """

    #: names of the param-group hyperparameters this rule reads, with defaults
    hyperparameters: dict[str, Any] = {}

    @abstractmethod
    def init_state(self, param: Tensor) -> dict[str, Tensor]: ...

    @abstractmethod
    def update(self, work: list[GroupWork], precond: Preconditioner, ok: Tensor) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
