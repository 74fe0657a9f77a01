"""Seed lists: parse the user's seed spec (``3``, ``0-9``, ``0,4,7``, ``[0,4,7]``) into distinct seeds."""

from __future__ import annotations

import re
from collections import Counter

from amax_lightning.base.errors import UserError

MAX_SEED = 2**63 - 1
MAX_SEEDS = 100_000  # seeds in one run; each holds n_tokens x width floats of parameter and Adam state
_RANGE = re.compile(r"^\s*([0-9]+)\s*-\s*([0-9]+)\s*$")


def _parse_one(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise UserError(f"seed {text!r} is not a non-negative integer")
    return int(text)


def parse_seeds(spec: int | str | list | tuple) -> list[int]:
    """Parse a seed spec into a list of distinct seeds, in the given order.

    Parameters
    ----------
    spec
        An int (``3``), a list of ints (``[0, 4, 7]``), or a string: ``"3"``, ``"0-9"`` (inclusive range),
        ``"0,4,7"`` or ``"[0,4,7]"``.

    Raises
    ------
    UserError
        If the spec is empty, malformed, holds a negative or too large seed, or repeats a seed.
    """
    if isinstance(spec, bool):
        raise UserError(f"seeds {spec!r} is not a seed spec; use e.g. 3, 0-9 or [0,4,7]")
    if isinstance(spec, int):
        seeds = [spec]
    elif isinstance(spec, (list, tuple)):
        seeds = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise UserError(f"seed {item!r} is not a non-negative integer")
            seeds.append(item if isinstance(item, int) else _parse_one(item))
    elif isinstance(spec, str):
        text = spec.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        match = _RANGE.match(text)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise UserError(f"seed range {spec!r} is empty; write it low-high, e.g. 0-9")
            if hi - lo + 1 > MAX_SEEDS:
                raise UserError(f"seed range {spec!r} holds {hi - lo + 1} seeds; at most {MAX_SEEDS} are allowed")
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [_parse_one(part) for part in text.split(",")] if text else []
    else:
        raise UserError(f"seeds {spec!r} is not a seed spec; use e.g. 3, 0-9 or [0,4,7]")
    if not seeds:
        raise UserError(f"seeds {spec!r} is empty; give at least one seed, e.g. 0-9")
    if len(seeds) > MAX_SEEDS:
        raise UserError(f"{len(seeds)} seeds given; at most {MAX_SEEDS} are allowed")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed} is out of range; seeds must lie in [0, {MAX_SEED}]")
    duplicates = sorted(s for s, n in Counter(seeds).items() if n > 1)
    if duplicates:
        raise UserError(f"seeds {spec!r} repeat {duplicates}; each seed may appear once")
    return seeds
