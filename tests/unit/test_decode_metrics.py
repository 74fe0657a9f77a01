"""Nearest-token decoding and the uniqueness metric on planted inputs with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amax_lightning.decode import CheckedNearestTokens, nearest_tokens, nearest_tokens_with_neighbours
from amax_lightning.metrics import UniqueTokens


def test_planted_rows_decode_to_themselves_with_cosine_one():
    vocab = torch.randn(1000, 32, generator=torch.Generator().manual_seed(0))
    planted = torch.tensor([[3, 999, 0], [42, 42, 7]])
    vectors = vocab[planted] * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1)  # cosine ignores the scale
    ids, cosine = nearest_tokens(vectors, vocab)
    assert torch.equal(ids, planted)
    torch.testing.assert_close(cosine, torch.ones(2, 3))


def test_decode_picks_highest_cosine_not_highest_dot_product():
    vocab = torch.tensor([[1.0, 0.0], [10.0, 10.0], [0.0, 1.0]])
    ids, cosine = nearest_tokens(torch.tensor([[1.0, 0.1]]), vocab)
    assert ids.tolist() == [0]
    torch.testing.assert_close(cosine, torch.tensor([1.0 / (1.01**0.5)]))


def test_chunking_does_not_change_the_answer():
    gen = torch.Generator().manual_seed(1)
    vocab, vectors = torch.randn(500, 16, generator=gen), torch.randn(37, 16, generator=gen)
    full = nearest_tokens(vectors, vocab, chunk_rows=10_000)
    chunked = nearest_tokens(vectors, vocab, chunk_rows=4)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_unique_tokens_counts_by_hand():
    metric = UniqueTokens()
    metric.update(torch.tensor([[5, 9, 5], [1, 9, 9]]))
    metric.update(torch.tensor([2]))
    assert metric.compute() == {"n_total": 7, "n_unique": 4, "token_ids": [1, 2, 5, 9], "counts": [1, 1, 2, 3]}


def test_token_agreement_by_hand():
    from amax_lightning.metrics import TokenAgreement

    metric = TokenAgreement()
    metric.update(torch.tensor([[1, 2, 3], [1, 5, 3]]))
    metric.update(torch.tensor([[4, 5, 3]]))
    out = metric.compute()
    assert out["position_agreement"] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert out["mean_pairwise_jaccard"] == pytest.approx((2 / 4 + 1 / 5 + 2 / 4) / 3)


def test_embedding_similarity_by_hand():
    from amax_lightning.metrics import EmbeddingSimilarity

    metric = EmbeddingSimilarity()
    metric.update(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 3.0]]]))
    out = metric.compute()
    half = 2**-0.5
    expected = torch.tensor([[1, 0, half], [0, 1, half], [half, half, 1]])
    torch.testing.assert_close(torch.tensor(out["matrix"]), expected, rtol=0, atol=1e-6)
    assert out["mean_pairwise_cosine"] == pytest.approx(2 * half / 3, abs=1e-6)


@pytest.mark.parametrize("d, scale", [(64, 1.0), (768, 0.14)])
def test_bf16_checked_decoding_equals_the_fp32_argmax(d, scale):
    """The null model's fast decoder gives nearest_tokens' ids, also for vectors planted near ties."""
    g = torch.Generator().manual_seed(d)
    vocab = torch.randn(50257, d, generator=g) * scale
    vectors = torch.randn(2048, d, generator=g)
    near_ties = F.normalize(vocab[:64], dim=-1) + F.normalize(vocab[64:128], dim=-1)  # halfway between two tokens
    vectors = torch.cat([vectors, near_ties + 1e-4 * torch.randn(64, d, generator=g)])
    expected, _ = nearest_tokens(vectors, vocab)
    decode = CheckedNearestTokens(vocab, block_rows=500)  # blocks of 500 rows, the last one shorter
    decode._pairs = decode._pairs[:, :10]  # the candidates' buffer must grow
    assert torch.equal(decode(vectors), expected)


def test_neighbours_are_the_k_highest_cosines():
    g = torch.Generator().manual_seed(3)
    vocab, vectors = torch.randn(500, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    nearest, nearest_cosine, ids, cosines = nearest_tokens_with_neighbours(vectors, vocab, k=5, chunk_rows=4)
    full = F.normalize(vectors, dim=-1) @ F.normalize(vocab, dim=-1).T
    expected = full.topk(5, dim=-1)
    assert ids.shape == (2, 7, 5) and torch.equal(ids, expected.indices)
    torch.testing.assert_close(cosines, expected.values)
    assert torch.equal(ids[..., 0], nearest_tokens(vectors, vocab)[0])
    assert torch.equal(nearest, nearest_tokens(vectors, vocab)[0])
    torch.testing.assert_close(nearest_cosine, nearest_tokens(vectors, vocab)[1])  # other chunking: last bits
