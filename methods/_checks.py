"""One-line argument checks for the methods' ``__init__``: one message style for every method.

Each raises :class:`~methods.base.MethodConfigError` worded ``"<method>: <name>=<value!r> must be
..."``, which the CLI prints as one line with exit code 2. ``method`` is the method's registry name
(``""`` leaves the prefix out, for plumbing that serves several methods).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from methods.base import MethodConfigError

__all__ = ["check_bool", "check_choice", "check_float", "check_int"]


def _fail(method: str, name: str, value: Any, must: str) -> MethodConfigError:
    prefix = f"{method}: " if method else ""
    return MethodConfigError(f"{prefix}{name}={value!r} must be {must}")


def check_choice(method: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise _fail(method, name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(method: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise _fail(method, name, value, "True or False")


def check_int(method: str, name: str, value: Any, low: int) -> None:
    """Raise unless ``value`` is an int >= ``low`` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(method, name, value, f"an integer >= {low}")


def check_float(
    method: str,
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """Raise unless ``value`` is a finite real number (int or float, not bool) in the interval.

    The interval is ``[low, high]``, open at an end where ``open_low`` / ``open_high`` says so;
    ``high = inf`` (the default) means no upper bound, and infinity itself is refused.
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
    if not ok:
        closing = ")" if open_high or math.isinf(high) else "]"
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{closing}"
        raise _fail(method, name, value, f"a number in {interval}")
