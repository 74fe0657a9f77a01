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


class CheckedNearestTokens:
    """The nearest token ids by cosine, as ``nearest_tokens`` finds them, from a bf16 matmul checked in fp32.

    bf16 scores keep, per vector, every token within ``2 * BF16_SCORE_ERROR`` of its best bf16 score (the true
    argmax is always among them); exact fp32 dot products of those candidates decide, ties to the lowest id.
    About 4x faster than the fp32 matmul on CPUs with bf16 matrix units. Vectors are decoded ``block_rows`` at a
    time into work buffers allocated once: the (block_rows, V) scores stay in cache, and no large temporary is
    allocated (and page-faulted in) again per block, which cost as much as the matmul on 2 CPU cores.

    Parameters
    ----------
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model), any float dtype.
    block_rows
        Vectors decoded at once (count, >= 1).
    """

    def __init__(self, vocab: torch.Tensor, block_rows: int = 256) -> None:
        self.unit_vocab = F.normalize(vocab.detach().float(), dim=-1)
        self.unit_vocab_bf16 = self.unit_vocab.to(torch.bfloat16)
        n_tokens, d = vocab.shape
        self.block_rows = block_rows
        self._scores = torch.empty(block_rows, n_tokens, dtype=torch.bfloat16, device=vocab.device)
        self._kept = torch.empty(block_rows, n_tokens, dtype=torch.bool, device=vocab.device)
        # gathered candidates (about 30 per vector on GPT-2 small); grown when a block needs more
        self._pairs = torch.empty(2, block_rows * 32, d, dtype=torch.float32, device=vocab.device)

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token ids, shape (n,), of the vectors (n, d_model) (any scale: decoding is by cosine)."""
        unit = F.normalize(vectors.float(), dim=-1)
        return torch.cat([self._block(block) for block in unit.split(self.block_rows)])

    def _block(self, unit: torch.Tensor) -> torch.Tensor:
        n, n_tokens = unit.shape[0], self.unit_vocab.shape[0]
        approx, kept = self._scores[:n], self._kept[:n]
        with _fp32_accumulation():
            torch.matmul(unit.to(torch.bfloat16), self.unit_vocab_bf16.T, out=approx)  # (n, V) bf16
        # the threshold, rounded to bf16, may rise by 2^-8 of |threshold| <= 1.05: lowered by 0.005 to stay safe
        threshold = (approx.amax(dim=-1, keepdim=True).float() - 2 * BF16_SCORE_ERROR - 0.005).to(torch.bfloat16)
        torch.ge(approx, threshold, out=kept)
        rows, cols = kept.nonzero(as_tuple=True)
        m = rows.numel()
        if m > self._pairs.shape[1]:
            self._pairs = self._pairs.new_empty(2, 2 * m, unit.shape[1])
        vectors = torch.index_select(unit, 0, rows, out=self._pairs[0, :m])
        tokens = torch.index_select(self.unit_vocab, 0, cols, out=self._pairs[1, :m])
        exact = vectors.mul_(tokens).sum(dim=-1)  # fp32 products and sum: no matmul, so no TF32 whatever the setting
        row_best = torch.full((n,), -torch.inf, device=exact.device).scatter_reduce(0, rows, exact, "amax")
        winners = exact == row_best[rows]
        ids = torch.full((n,), n_tokens, dtype=torch.long, device=exact.device)
        return ids.scatter_reduce(0, rows[winners], cols[winners], "amin")
