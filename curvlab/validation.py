"""Argument checks that name the bad argument and the valid range or choices."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` must be a real number in the given interval; returns it as float."""
    lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    interval = f"{lo}, {hi}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}") from None
    ok = not math.isnan(number)
    if low is not None:
        ok = ok and (number >= low if low_inclusive else number > low)
    if high is not None:
        ok = ok and (number <= high if high_inclusive else number < high)
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
