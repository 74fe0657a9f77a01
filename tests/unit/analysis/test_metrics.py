"""The reproducibility metrics (torchmetrics) on planted token ids and embeddings, by hand."""

from __future__ import annotations

import pytest
import torch

from amax_lightning.analysis.metrics import UniqueTokens


def test_unique_tokens_counts_by_hand():
    metric = UniqueTokens()
    metric.update(torch.tensor([[5, 9, 5], [1, 9, 9]]))
    metric.update(torch.tensor([2]))
    assert metric.compute() == {"n_total": 7, "n_unique": 4, "token_ids": [1, 2, 5, 9], "counts": [1, 1, 2, 3]}


def test_token_agreement_by_hand():
    from amax_lightning.analysis.metrics import TokenAgreement

    metric = TokenAgreement()
    metric.update(torch.tensor([[1, 2, 3], [1, 5, 3]]))
    metric.update(torch.tensor([[4, 5, 3]]))
    out = metric.compute()
    assert out["position_agreement"] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert out["mean_pairwise_jaccard"] == pytest.approx((2 / 4 + 1 / 5 + 2 / 4) / 3)


def test_embedding_similarity_by_hand():
    from amax_lightning.analysis.metrics import EmbeddingSimilarity

    metric = EmbeddingSimilarity()
    metric.update(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 3.0]]]))
    out = metric.compute()
    half = 2**-0.5
    expected = torch.tensor([[1, 0, half], [0, 1, half], [half, half, 1]])
    torch.testing.assert_close(torch.tensor(out["matrix"]), expected, rtol=0, atol=1e-6)
    assert out["mean_pairwise_cosine"] == pytest.approx(2 * half / 3, abs=1e-6)
