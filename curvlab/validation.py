"""Argument checks that name the bad argument and the valid range or choices.

Numbers must *be* numbers: a string that parses as one (``lr = "0.01"`` in a .gin file) is an
error, because it is almost always a quoting mistake and because passing it on would fail much
later, far from the binding that caused it.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value, key or file, explained in one line (the command line prints
    ``error: <message>`` without a traceback)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _not_a_number(name: str, value: Any, what: str) -> ValueError:
    if isinstance(value, (str, bytes)):
        return ValueError(
            f"{name} must be {what}, got the string {value!r} (write the number without quotes)"
        )
    return ValueError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` must be a real number (not a string, not a bool) in the given interval;
    returns it as float."""
    lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    interval = f"{lo}, {hi}"
    # numbers, numpy scalars and 0-dim tensors (anything with __float__); never text or bools
    if isinstance(value, (str, bytes, bool)) or not (
        isinstance(value, numbers.Real) or _float_like(value)
    ):
        raise _not_a_number(name, value, f"a real number in {interval}")
    number = float(value)
    ok = not math.isnan(number)
    if low is not None:
        ok = ok and (number >= low if low_inclusive else number > low)
    if high is not None:
        ok = ok and (number <= high if high_inclusive else number < high)
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def _float_like(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return hasattr(value, "__float__")


def check_int(name: str, value: Any, low: int | None = None) -> int:
    """``value`` must be an integer (not a bool, not a float such as 1.5 or 2.0) ``>= low``."""
    what = "an integer" if low is None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _not_a_number(name, value, what)
    if low is not None and value < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, 1)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}{hint}"
        )
    return value
