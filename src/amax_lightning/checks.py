"""Checks of user-given values: each returns the value or raises a one-line UserError naming it."""

from __future__ import annotations

import math

import numpy as np

from amax_lightning.errors import UserError


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a UserError listing them."""
    if value not in allowed:
        raise UserError(f"{name} {value!r} is unknown; allowed: {', '.join(allowed)}")
    return value


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name} {value!r} is not an integer")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{name} {value!r} is out of range; it must be {allowed}")
    return int(value)


def check_number(name: str, value, low_open: bool, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite number in ``(0, high]`` (``low_open``) or ``[0, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} {value!r} is not a finite number")
    if value < 0 or (value == 0 and low_open) or value > high:
        allowed = f"{'(' if low_open else '['}0, {high:g}]" if math.isfinite(high) else ("> 0" if low_open else ">= 0")
        raise UserError(f"{name} {value!r} is out of range; allowed: {allowed}")
    return float(value)
