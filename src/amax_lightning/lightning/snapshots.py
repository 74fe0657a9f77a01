"""Snapshots during a fit (``analysis/convergence.py``): every ``every`` steps and at the last step, every row's
current tokens, decoded as the end of the fit decodes them; per unit n_unique, the changed fraction and the mean
objective; and the stop when every row's tokens have been unchanged for ``stop_when_stable`` snapshot intervals.

Under DDP each process decodes its own shard of rows and the tokens are gathered (one collective, at the same steps
on every process), so every process holds the same snapshots and takes the same decision to stop. The snapshots
ride in the checkpoint (the ResultsWriter's state), so a resumed fit continues them exactly.
"""

from __future__ import annotations

import torch

from amax_lightning.analysis.convergence import (
    Convergence,
    Snapshot,
    convergence_of,
    default_snapshot_every,
    snapshot_numbers,
    stable_for,
    stable_since,
)
from amax_lightning.model.decode import CheckedNearestTokens, nearest_tokens
from amax_lightning.optimize.search import TokenSearch


class Snapshots:
    """The snapshots of one fit. ``every`` None: ``default_snapshot_every(max_steps)``; ``stop_when_stable`` None:
    never stop early."""

    def __init__(self, every: int | None = None, stop_when_stable: int | None = None) -> None:
        self.every, self.stop_when_stable = every, stop_when_stable
        self.decoder: CheckedNearestTokens | None = None
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.n_unique: list[torch.Tensor] = []  # per snapshot, (units,)
        self.changed: list[torch.Tensor] = []
        self.mean_objective: list[torch.Tensor] = []
        self.previous: torch.Tensor | None = None  # every row's tokens at the last snapshot (rows, n_tokens)

    def interval(self, max_steps: int) -> int:
        return self.every or default_snapshot_every(max_steps)

    def due(self, step: int, max_steps: int) -> bool:
        """Whether step ``step`` (steps done) takes a snapshot that is not taken yet."""
        if step <= 0 or (self.steps and self.steps[-1] >= step):
            return False
        return step % self.interval(max_steps) == 0 or step >= max_steps

    def take(self, module, step: int) -> None:
        """Decode every row's current tokens (this process its shard, then gathered) and record the units' numbers."""
        if self.decoder is None and module.search is None:  # kept: it times the fast path once, then uses it
            self.decoder = CheckedNearestTokens(module.backbone.vocab_embeddings)
        tokens = current_tokens(module, self.decoder)
        n_unique, changed, mean = snapshot_numbers(tokens, self.previous, module.last_objective, module.layout.n_seeds)
        self.steps.append(step)
        self.n_unique.append(n_unique)
        self.changed.append(changed)
        self.mean_objective.append(mean)
        self.previous = tokens.cpu()

    def stable(self) -> bool:
        """Whether every row's tokens were unchanged for ``stop_when_stable`` snapshot intervals."""
        if not self.stop_when_stable:
            return False
        return stable_for([bool(c.gt(0).any()) for c in self.changed], self.stop_when_stable)

    def convergence(self, unit: int, stopped_at: int, reason: str, n_total: int, max_steps: int | None
                    ) -> Convergence:
        """Unit ``unit``'s snapshots and verdict (``n_total`` tokens: its seeds x positions)."""
        snapshots = [Snapshot(step, int(n[unit]), float(c[unit]), float(m[unit]))
                     for step, n, c, m in zip(self.steps, self.n_unique, self.changed, self.mean_objective)]
        return convergence_of(snapshots, stopped_at, reason, n_total, max_steps)

    def unit_arrays(self) -> dict[str, torch.Tensor]:
        """Every unit's snapshots as tensors for a sweep's tables: ``snapshot_n_unique``, ``snapshot_changed_fraction``
        and ``snapshot_mean_objective`` (units, snapshots), ``stable_since`` (units,; -1 for none) and
        ``changed_fraction_last`` (units,; NaN without snapshots)."""
        if not self.steps:
            return {}
        changed = torch.stack(self.changed).T  # (units, snapshots)
        since = torch.tensor([-1 if (s := stable_since(self.steps, row)) is None else s for row in changed.tolist()])
        return {"snapshot_n_unique": torch.stack(self.n_unique).T, "snapshot_changed_fraction": changed,
                "snapshot_mean_objective": torch.stack(self.mean_objective).T, "stable_since": since,
                "changed_fraction_last": changed[:, -1]}

    def state_dict(self) -> dict:
        return {"steps": torch.tensor(self.steps, dtype=torch.long),
                "n_unique": torch.stack(self.n_unique) if self.n_unique else torch.empty(0),
                "changed": torch.stack(self.changed) if self.changed else torch.empty(0),
                "mean_objective": torch.stack(self.mean_objective) if self.mean_objective else torch.empty(0),
                "previous": self.previous if self.previous is not None else torch.empty(0)}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.steps = state["steps"].tolist()
        if self.steps:
            self.n_unique, self.changed = list(state["n_unique"]), list(state["changed"])
            self.mean_objective = list(state["mean_objective"])
            self.previous = state["previous"]


def current_tokens(module, decoder: CheckedNearestTokens | None = None) -> torch.Tensor:
    """Every row's tokens now (rows, n_tokens): token search's best sequences, or the nearest tokens (cosine) of the
    current embeddings, this process decoding its own shard (a collective under DDP). ``decoder``: the checked fast
    path (``decode.CheckedNearestTokens``, the same ids as ``nearest_tokens``, which is used without one)."""
    if module.search is not None:
        return TokenSearch.best(module.search_state())[0]
    shard = module.layout.shard
    with torch.no_grad():
        embedding = module.objective.embeddings(module.parameter[shard])
        if decoder is None:
            ids = nearest_tokens(embedding, module.backbone.vocab_embeddings)[0]
        else:
            ids = decoder(embedding.reshape(-1, embedding.shape[-1])).reshape(embedding.shape[:-1])
    return module.gather_rows(ids)
