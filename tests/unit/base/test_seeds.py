"""Seed specs: parsing, and the one-line errors users see."""

from __future__ import annotations

import pytest

from amax_lightning.base.errors import UserError
from amax_lightning.base.seeds import parse_seeds


@pytest.mark.parametrize(
    "spec, seeds",
    [(3, [3]), ("3", [3]), ("0-9", list(range(10))), ("[0,4,7]", [0, 4, 7]), ("0, 4,7", [0, 4, 7]),
     ([7, 0, 4], [7, 0, 4]), (["1", "2"], [1, 2]), ("5-5", [5])],
)
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize(
    "spec, message",
    [("", "empty"), ([], "empty"), ("[]", "empty"), ("3-1", "empty"), ("0,0", "repeat"), ([1, 2, 1], "repeat"),
     ("-1", "not a non-negative"), ([-1], "out of range"), ("a", "not a non-negative"), (True, "not a seed spec"),
     (1.5, "not a seed spec"), (str(2**64), "out of range"), ("٣", "not a non-negative")],
)
def test_bad_seeds(spec, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(spec)
