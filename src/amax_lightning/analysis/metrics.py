"""Reproducibility metrics as torchmetrics Metrics. Their ``cat`` states make them DDP-safe when each process
updates with its own shard; amax_lightning gathers the rows itself and computes them on rank 0
(``sync_on_compute=False``), one unit at a time."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class UniqueTokens(Metric):
    """How many distinct token ids the decoded vectors of all seeds x positions hold (``numpy.unique``).

    ``compute`` returns ``{"n_total", "n_unique", "token_ids", "counts"}``, ``token_ids`` ascending.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
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


class TokenAgreement(Metric):
    """Do seeds agree on their decoded tokens?  Updated with token ids of shape (seeds, n_tokens).

    ``compute`` returns ``position_agreement`` (per position: the share of seeds holding that position's most
    common token; 1/seeds when all differ, 1 when all agree), its mean, and ``mean_pairwise_jaccard``: the mean
    over seed pairs of |A & B| / |A | B| for the seeds' token sets (1.0 for a single seed).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("token_ids", default=[], dist_reduce_fx="cat")

    def update(self, token_ids: torch.Tensor) -> None:
        self.token_ids.append(token_ids.long())

    def compute(self) -> dict:
        ids = dim_zero_cat(self.token_ids).cpu().numpy()
        agreement = [np.unique(ids[:, t], return_counts=True)[1].max() / ids.shape[0] for t in range(ids.shape[1])]
        sets = [set(row.tolist()) for row in ids]
        pairs = list(itertools.combinations(sets, 2))
        jaccard = float(np.mean([len(a & b) / len(a | b) for a, b in pairs])) if pairs else 1.0
        return {
            "position_agreement": [float(a) for a in agreement],
            "mean_position_agreement": float(np.mean(agreement)),
            "mean_pairwise_jaccard": jaccard,
        }


class EmbeddingSimilarity(Metric):
    """Cosine similarity between the seeds' optimized embeddings, each flattened to one (n_tokens*d) vector.

    Updated with embeddings (seeds, n_tokens, d_model); ``compute`` returns the (seeds, seeds) ``matrix`` and
    ``mean_pairwise_cosine`` over distinct pairs (1.0 for a single seed).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor) -> None:
        self.embeddings.append(embeddings.reshape(embeddings.shape[0], -1).float())

    def compute(self) -> dict:
        flat = F.normalize(dim_zero_cat(self.embeddings), dim=-1)
        matrix = (flat @ flat.T).clamp(-1.0, 1.0).cpu()
        n = matrix.shape[0]
        off_diagonal = matrix[~torch.eye(n, dtype=torch.bool)]
        mean = float(off_diagonal.mean()) if n > 1 else 1.0
        return {"matrix": matrix.tolist(), "mean_pairwise_cosine": mean}
