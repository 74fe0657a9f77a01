"""Has the answer settled? Snapshots of every unit's decoded tokens during the fit, and the verdict read off them.

Every ``snapshot_every`` steps (and at the last step) each row's current tokens are decoded the way the end of the
fit decodes them (nearest cosine, or token search's best sequence). Per unit a snapshot records n_unique over its
seeds x positions, the fraction of those tokens that changed since the previous snapshot, and the mean objective
over its seeds. ``stable_since`` is the earliest snapshot step from which no token of any seed changed up to the
last snapshot (None when the last two snapshots differ, or with a single snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

STOP_REASONS = ("max_steps", "stable", "interrupted")
SNAPSHOTS = 20  # the default snapshot_every gives about this many snapshots over max_steps


def default_snapshot_every(max_steps: int) -> int:
    """About ``SNAPSHOTS`` snapshots over ``max_steps`` steps (at least every step)."""
    return max(1, max_steps // SNAPSHOTS)


@dataclass(frozen=True)
class Snapshot:
    """One unit at one snapshot."""

    step: int
    n_unique: int
    changed_fraction: float  # of its seeds x positions tokens, changed since the previous snapshot (0.0 at the first)
    mean_objective: float  # over its seeds


@dataclass(frozen=True)
class Convergence:
    """Whether a unit's tokens had stopped changing when the fit ended, and where and why it ended."""

    snapshots: list[Snapshot]
    stable_since: Optional[int]
    stopped_at: int
    stop_reason: str  # max_steps, stable or interrupted
    verdict: str = ""  # the sentence the pages show (``verdict``)


def convergence_of(snapshots: list[Snapshot], stopped_at: int, stop_reason: str, n_total: int,
                   max_steps: int | None) -> Convergence:
    """A unit's ``Convergence`` from its snapshots, with ``stable_since`` and the verdict sentence."""
    since = stable_since([s.step for s in snapshots], [s.changed_fraction for s in snapshots])
    plain = Convergence(snapshots, since, stopped_at, stop_reason)
    return Convergence(snapshots, since, stopped_at, stop_reason, verdict(plain, n_total, max_steps))


def snapshot_numbers(token_ids: torch.Tensor, previous: torch.Tensor | None, objective: torch.Tensor, n_seeds: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per unit: n_unique, the changed fraction and the mean objective, from every row's tokens (rows, n_tokens),
    the previous snapshot's tokens (None at the first) and every row's objective (rows,); rows are unit-major with
    ``n_seeds`` seeds each. Returns three tensors of shape (units,)."""
    ids = token_ids.reshape(-1, n_seeds * token_ids.shape[-1])
    ordered = ids.sort(dim=1).values
    n_unique = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
    if previous is None:
        changed = torch.zeros(ids.shape[0], dtype=torch.float64)
    else:
        changed = (token_ids != previous).reshape(ids.shape).double().mean(dim=1).cpu()
    mean = objective.double().reshape(-1, n_seeds).mean(dim=1).cpu()
    return n_unique.cpu(), changed, mean


def stable_since(steps: list[int], changed: list[float]) -> int | None:
    """The earliest snapshot step from which no token changed up to the last snapshot; None if the last snapshot
    changed anything or there is only one snapshot. ``changed[i]``: the changed fraction at ``steps[i]``."""
    if len(steps) < 2 or changed[-1] > 0:
        return None
    last_change = len(steps) - 1
    while last_change >= 1 and changed[last_change] == 0:
        last_change -= 1
    return steps[last_change]  # the tokens of this snapshot are those of every later one


def stable_for(changed_any: list[bool], intervals: int) -> bool:
    """Whether no row's tokens changed in the last ``intervals`` snapshot intervals (``changed_any[i]``: whether any
    token changed at snapshot i; the first snapshot has no interval before it)."""
    return len(changed_any) > intervals and not any(changed_any[-intervals:])


def verdict(convergence: Convergence, n_total: int, max_steps: int | None = None) -> str:
    """The convergence verdict in words, as results.json, report.md and report.html all state it."""
    last = convergence.snapshots[-1] if convergence.snapshots else None
    end = f" of {max_steps}" if max_steps else ""
    if convergence.stable_since is not None:
        text = f"settled: no token changed since step {convergence.stable_since}{end}"
        if convergence.stop_reason == "stable":
            text += f" (stopped early at step {convergence.stopped_at}: stable)"
        return text
    if last is None or len(convergence.snapshots) < 2:
        return "not known: fewer than two snapshots"
    before = convergence.snapshots[-2].step
    changed = round(last.changed_fraction * n_total)
    return (f"still changing: {changed} of {n_total} tokens changed between steps {before} and {last.step}; "
            "more steps may change n_unique")
