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


PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")  # the learned parameter and Adam stay >= fp32
MATMUL_PRECISIONS = ("highest", "high", "medium")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
MAX_ROWS = 1_000_000  # units x seeds in one run
MAX_PARAMETER_ELEMENTS = 2**31  # rows x n_tokens x width: 8 GiB in fp32, 24 GiB with Adam's two moments


def check_precision(precision: str) -> str:
    """Return Lightning's ``precision`` if the run may use it; a UserError for half-precision parameters."""
    if str(precision) not in PRECISIONS:
        raise UserError(
            f"trainer.precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)} "
            "(the learned embedding and its Adam state must stay in fp32 or fp64)"
        )
    return str(precision)


def check_world_size(n_rows: int, world_size: int) -> None:
    """Raise a UserError unless every process gets at least one row (unit x seed)."""
    if n_rows < world_size:
        raise UserError(f"{n_rows} run(s) (units x seeds) for {world_size} processes; give at least one per process")


def check_run_size(n_rows: int, n_tokens: int, width: int) -> None:
    """Raise a UserError if the run's rows or learned parameter exceed ``MAX_ROWS`` / ``MAX_PARAMETER_ELEMENTS``."""
    if n_rows > MAX_ROWS:
        raise UserError(f"{n_rows} runs (units x seeds) are too many; at most {MAX_ROWS} are allowed")
    elements = n_rows * n_tokens * width
    if elements > MAX_PARAMETER_ELEMENTS:
        raise UserError(
            f"the learned parameter would hold {n_rows} x {n_tokens} x {width} = {elements} numbers; at most "
            f"{MAX_PARAMETER_ELEMENTS} are allowed (fewer units, seeds or tokens)"
        )
