"""Nearest-token decoding by cosine similarity, and the activation of the decoded tokens."""

from __future__ import annotations

import contextlib

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
    ids, cosines = [], []
    for scores in _cosine_chunks(vectors, vocab, chunk_rows):
        best = scores.max(dim=-1)
        ids.append(best.indices)
        cosines.append(best.values)
    shape = vectors.shape[:-1]
    return torch.cat(ids).view(shape), torch.cat(cosines).clamp(-1.0, 1.0).view(shape)


@torch.no_grad()
def nearest_tokens_with_neighbours(vectors: torch.Tensor, vocab: torch.Tensor, k: int = 5, chunk_rows: int = 1024
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nearest_tokens`` and, from the same similarities, the ``k`` nearest tokens of each vector, best first.

    Returns ``token_ids``, ``cosine`` (shape ``vectors.shape[:-1]``, as ``nearest_tokens``) and ``top_ids``,
    ``top_cosine`` (shape ``vectors.shape[:-1] + (k,)``, k at most V).
    """
    k = min(k, vocab.shape[0])
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for scores in _cosine_chunks(vectors, vocab, chunk_rows):
        best, top = scores.max(dim=-1), scores.topk(k, dim=-1)
        for part, tensor in zip(parts, (best.indices, best.values, top.indices, top.values)):
            part.append(tensor)
    shape = vectors.shape[:-1]
    ids, cosine, top_ids, top_cosine = (torch.cat(part) for part in parts)
    return (ids.view(shape), cosine.clamp(-1.0, 1.0).view(shape), top_ids.view(*shape, k),
            top_cosine.clamp(-1.0, 1.0).view(*shape, k))


def _cosine_chunks(vectors: torch.Tensor, vocab: torch.Tensor, chunk_rows: int):
    """Cosine similarities of the flattened vectors with every vocabulary row, (chunk_rows, V) at a time, fp32."""
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    unit_vocab = F.normalize(vocab.float(), dim=-1)
    for chunk in flat.split(chunk_rows):
        yield chunk @ unit_vocab.T


# |bf16 score - exact score| for unit vectors: operands rounded to bf16 (2 * 2^-8 + 2^-16), the fp32 accumulation
# over d <= 16384 terms (< 2^-10), the result rounded to bf16 (2^-8 of |score| <= 1): 0.01271 in all, so 0.013.
# It needs fp32 accumulation: on CUDA the bf16 reduced-precision reduction is switched off for the matmul.
BF16_SCORE_ERROR = 0.013


@contextlib.contextmanager
def _fp32_accumulation():
    """cuBLAS may reduce bf16 products in bf16 unless told not to; the error bound above assumes fp32 sums."""
    previous = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = previous


@torch.no_grad()
def nearest_token_ids_checked(unit_vectors: torch.Tensor, unit_vocab: torch.Tensor, unit_vocab_bf16: torch.Tensor
                              ) -> torch.Tensor:
    """The nearest token ids by cosine, as ``nearest_tokens`` finds them, from a bf16 matmul checked in fp32.

    bf16 scores keep, per vector, every token within ``2 * BF16_SCORE_ERROR`` of its best bf16 score (the true
    argmax is always among them); exact fp32 dot products of those candidates decide, ties to the lowest id.
    About 4x faster than the fp32 matmul on CPUs with bf16 matrix units. Inputs are L2-normalized: vectors (n, d)
    and vocabulary (V, d) in fp32, and the vocabulary in bf16.
    """
    with _fp32_accumulation():
        approx = unit_vectors.to(torch.bfloat16) @ unit_vocab_bf16.T  # (n, V) in bf16: no fp32 copy of it
    # the threshold, rounded to bf16, may rise by 2^-8 of |threshold| <= 1.05: lowered by 0.005 to stay safe
    threshold = (approx.max(dim=-1, keepdim=True).values.float() - 2 * BF16_SCORE_ERROR - 0.005).to(torch.bfloat16)
    rows, cols = (approx >= threshold).nonzero(as_tuple=True)
    exact = (unit_vectors[rows] * unit_vocab[cols]).sum(dim=-1)
    n = unit_vectors.shape[0]
    row_best = torch.full((n,), -torch.inf, device=exact.device).scatter_reduce(0, rows, exact, "amax")
    winners = exact == row_best[rows]
    ids = torch.full((n,), unit_vocab.shape[0], dtype=torch.long, device=exact.device)
    return ids.scatter_reduce(0, rows[winners], cols[winners], "amin")
