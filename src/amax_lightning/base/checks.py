"""Checks of user-given values: each returns the value or raises a one-line UserError naming it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from amax_lightning.base.errors import NonFiniteError, UserError


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


def check_resumable(saved: dict, current: dict, keys: Sequence[str]) -> None:
    """Raise a UserError naming the first of ``keys`` whose saved (checkpoint) and current values differ; keys the
    checkpoint does not hold are skipped."""
    for key in keys:
        if key in saved and saved[key] != current[key]:
            raise UserError(f"checkpoint was made with {key}={saved[key]!r} but this run has {key}={current[key]!r}; "
                            "resume with the same settings")


class FiniteCheck:
    """Stops a run at its first non-finite loss or activation, naming the step and the bad rows.

    With ``every`` = 1 the host looks at every step (one device sync per step). With N > 1 the device remembers the
    first bad step and its rows and the host looks only every N steps, at ``last_step`` and whenever ``flush`` is
    called (before every checkpoint), so a GPU step never waits for the host, and the error names the step the run
    went bad at either way.

    Parameters
    ----------
    every
        Steps between the host's looks (>= 1).
    message
        ``message(bad_rows, step)``: the NonFiniteError's text for the rows (bool mask over every row).
    """

    def __init__(self, every: int, message: Callable[[torch.Tensor, int], str]) -> None:
        self.every = every
        self.message = message
        self._first_bad_step: torch.Tensor | None = None  # -1 while every step so far was finite
        self._first_bad_rows: torch.Tensor | None = None

    def observe(self, finite: torch.Tensor, step: int, last_step: int) -> None:
        """Note step ``step``'s per-row finiteness (bool over every row, gathered from all processes, so that all
        stop at the same step); raise if the host looks and sees a bad step."""
        if self.every == 1:
            if not bool(finite.all()):
                raise NonFiniteError(self.message(~finite, step))
            return
        if self._first_bad_step is None or self._first_bad_step.device != finite.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=finite.device)
            self._first_bad_rows = torch.zeros_like(finite)
        first = (self._first_bad_step < 0) & ~finite.all()
        self._first_bad_step = torch.where(first, step, self._first_bad_step)
        self._first_bad_rows = torch.where(first, ~finite, self._first_bad_rows)
        if (step + 1) % self.every == 0 or step + 1 == last_step:
            self.flush()

    def flush(self) -> None:
        """Raise NonFiniteError if a step seen so far had a non-finite value."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteError(self.message(self._first_bad_rows, int(self._first_bad_step)))
