"""UpdateRule: consumes gradients and a preconditioner, owns its own state (momentum, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor


class Preconditioner(ABC):
    """The curvature of the current step, for the parameters of one param group."""

    @abstractmethod
    def solve(
        self, params: list[Tensor], tensors: list[Tensor], power: float = 1.0
    ) -> list[Tensor]:
        """``F^{-power} v`` for each ``(param, v)`` pair (new tensors)."""

    def add_solved_(
        self,
        params: list[Tensor],
        tensors: list[Tensor],
        alpha: float,
        power: float = 1.0,
        divisors: list[Tensor] | None = None,
    ) -> None:
        """``θ += α · F^{-power} v / d`` in place for every ``(θ, v, d)``; a divisor ``d``
        (0-dim tensor) of ``inf`` leaves θ unchanged. Implementations fuse this (no new
        parameter-sized tensors); this default goes through :meth:`solve`."""
        directions = self.solve(params, tensors, power)
        if divisors is not None:
            directions = torch._foreach_div(directions, divisors)
        torch._foreach_add_(params, directions, alpha=alpha)

    @abstractmethod
    def dense_diagonal(self, param: Tensor) -> Tensor:
        """The diagonal of ``F`` for ``param`` (damping included), shaped like the parameter."""

    def shard_group(self, param: Tensor) -> Any | None:
        """The process group over which ``param``'s rows are split when the step works on a
        shard (FSDP2; ``param`` is then the local rows), else None. A rule that sums over
        parameters (K-FAC's KL clip) all-reduces the sums of sharded parameters over it."""
        return None


#: reading a 0-dim CPU tensor costs nothing (there is no device to wait for), so on CPU the
#: rules may branch on the step's finite flag; tests switch this off to run the device path
READ_CPU_FLAGS = True


def known_flag(flag: Tensor) -> bool | None:
    """The value of a 0-dim bool flag when reading it is free (a CPU tensor), else ``None``.

    On CUDA reading it would wait for the device, so rules blend with the tensor instead; on
    CPU, knowing it saves a masking pass over every gradient.
    """
    if READ_CPU_FLAGS and flag.device.type == "cpu":
        return bool(flag)
    return None


#: one param group's share of a step: (group dict, params with grads, their grads, their states)
GroupWork = tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict[str, Tensor]]]


class UpdateRule(ABC):
    """One step of all param groups: ``update(work, precond, ok)``.

    All groups come in one call so that a layer whose weight and bias sit in different groups
    is still preconditioned jointly (one ``precond.solve`` or ``precond.add_solved_`` over
    every parameter).

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
