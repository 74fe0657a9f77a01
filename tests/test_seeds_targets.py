"""Seed specs, per-process shards and target specs: parsing and the errors users see."""

from __future__ import annotations

import pytest

from amax_lightning.errors import UserError
from amax_lightning.seeds import parse_seeds, shard_bounds
from amax_lightning.targets import Target, parse_target


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


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (10, 3), (7, 4), (4, 4)])
def test_shards_cover_seeds_in_order(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_parse_target():
    assert parse_target("blocks.8.hook_resid_pre:91", 12, 768) == Target(8, "hook_resid_pre", 91)
    assert parse_target("blocks.8.hook_resid_pre:91", 12, 768).spec == "blocks.8.hook_resid_pre:91"


@pytest.mark.parametrize(
    "spec, message",
    [("blocks.12.hook_resid_pre:0", "layer 12 is out of range"), ("blocks.-1.hook_resid_pre:0", "layer -1"),
     ("blocks.8.hook_resid_pre:768", "unit 768 is out of range"), ("blocks.8.hook_nope:1", "hook 'hook_nope' is unknown"),
     ("blocks.8.hook_resid_pre", "malformed"), ("8:91", "malformed"), ("", "malformed"), (None, "malformed")],
)
def test_bad_targets(spec, message):
    with pytest.raises(UserError, match=message):
        parse_target(spec, 12, 768)
