"""The convergence numbers: per-unit snapshot numbers against a loop, stable_since and the stop rule against their
definitions, and the verdict's words."""

from __future__ import annotations

import pytest
import torch

from amax_lightning.analysis.convergence import (
    Snapshot,
    convergence_of,
    default_snapshot_every,
    snapshot_numbers,
    stable_for,
    stable_since,
)


def test_snapshot_numbers_equal_a_loop_over_units():
    g = torch.Generator().manual_seed(0)
    units, seeds, n_tokens = 4, 3, 5
    tokens = torch.randint(0, 7, (units * seeds, n_tokens), generator=g)
    previous = tokens.clone()
    previous[seeds : 2 * seeds, 0] += 1  # unit 1: 3 of its 15 tokens changed
    objective = torch.randn(units * seeds, generator=g)
    n_unique, changed, mean = snapshot_numbers(tokens, previous, objective, seeds)
    for u in range(units):
        rows = slice(u * seeds, (u + 1) * seeds)
        assert n_unique[u] == len(set(tokens[rows].flatten().tolist()))
        assert changed[u] == (3 / 15 if u == 1 else 0.0)
        assert mean[u] == pytest.approx(float(objective[rows].double().mean()))
    assert snapshot_numbers(tokens, None, objective, seeds)[1].eq(0).all()  # the first snapshot: nothing before it


def brute_stable_since(steps, changed):
    """The definition: the earliest snapshot from which every later snapshot changed nothing; None if the last did."""
    if len(steps) < 2 or changed[-1] > 0:
        return None
    return next(steps[i] for i in range(len(steps)) if all(c == 0 for c in changed[i + 1 :]))


@pytest.mark.parametrize("changed", [[0.0], [0.0, 0.5], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.2, 0.1, 0.0, 0.0],
                                     [0.0, 0.0, 0.3, 0.0], [0.0, 0.4, 0.4, 0.4]])
def test_stable_since_is_its_definition(changed):
    steps = [25 * (i + 1) for i in range(len(changed))]
    assert stable_since(steps, changed) == brute_stable_since(steps, changed)


def test_stop_rule_needs_n_unchanged_intervals_after_the_first_snapshot():
    assert not stable_for([False], 1)  # the first snapshot has no interval before it
    assert stable_for([False, False], 1) and not stable_for([False, False], 2)
    assert stable_for([False, True, False, False], 2) and not stable_for([False, True, False, False], 3)


def test_verdicts_say_settled_or_still_changing_in_the_issues_words():
    settled = convergence_of([Snapshot(s, 10, c, 1.0) for s, c in ((320, 0.1), (340, 0.0), (500, 0.0))], 500,
                             "max_steps", 50, 500)
    assert settled.stable_since == 320 and settled.verdict == "settled: no token changed since step 320 of 500"
    changing = convergence_of([Snapshot(475, 12, 0.3, 1.0), Snapshot(500, 14, 0.28, 1.2)], 500, "max_steps", 50, 500)
    assert changing.stable_since is None
    assert changing.verdict == ("still changing: 14 of 50 tokens changed between steps 475 and 500; more steps may "
                                "change n_unique")
    early = convergence_of([Snapshot(s, 3, c, 1.0) for s, c in ((10, 0.0), (20, 0.2), (30, 0.0), (40, 0.0))], 40,
                           "stable", 50, 500)
    assert early.verdict == "settled: no token changed since step 20 of 500 (stopped early at step 40: stable)"
    assert default_snapshot_every(500) == 25 and default_snapshot_every(7) == 1
