"""Nearest-token decoding by cosine similarity, and the activation of the decoded tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, vocab: torch.Tensor, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each vector to the vocabulary row of highest cosine similarity.

    Parameters
    ----------
    vectors
        Vectors to decode, shape (..., d_model).
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model).
    chunk_rows
        Vectors compared at once; bounds the (chunk_rows, V) similarity matrix held in memory.

    Returns
    -------
    token_ids, cosine
        Both of shape ``vectors.shape[:-1]``: the argmax token id (lowest id on ties) and its cosine in [-1, 1].
    """
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    unit_vocab = F.normalize(vocab.float(), dim=-1)
    ids, cosines = [], []
    for chunk in flat.split(chunk_rows):
        best = (chunk @ unit_vocab.T).max(dim=-1)
        ids.append(best.indices)
        cosines.append(best.values)
    shape = vectors.shape[:-1]
    return torch.cat(ids).view(shape), torch.cat(cosines).clamp(-1.0, 1.0).view(shape)
