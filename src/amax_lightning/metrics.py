"""Reproducibility metrics as torchmetrics Metrics, so each process updates with its own shard of seeds."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class UniqueTokens(Metric):
    """How many distinct token ids the decoded vectors of all seeds x positions hold (``numpy.unique``).

    ``update`` takes a process's decoded ids of any shape; ``compute`` gathers every process's ids and returns
    ``{"n_total", "n_unique", "token_ids", "counts"}`` with ``token_ids`` ascending and ``counts`` aligned.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("token_ids", default=[], dist_reduce_fx="cat")

    def update(self, token_ids: torch.Tensor) -> None:
        self.token_ids.append(token_ids.reshape(-1).long())

    def compute(self) -> dict:
        all_ids = dim_zero_cat(self.token_ids).cpu().numpy()
        values, counts = np.unique(all_ids, return_counts=True)
        return {
            "n_total": int(all_ids.size),
            "n_unique": int(values.size),
            "token_ids": [int(v) for v in values],
            "counts": [int(c) for c in counts],
        }
