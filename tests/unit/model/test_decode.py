"""Nearest-token decoding on planted inputs with known answers; both first-pass paths (fp32, bf16) and the choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import amax_lightning.model.decode as decode_module
from amax_lightning.base.errors import UserError
from amax_lightning.model.decode import (
    DECODE_ENV,
    CheckedNearestTokens,
    device_kind,
    nearest_tokens,
    nearest_tokens_with_neighbours,
)


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


@pytest.mark.parametrize("path", ["bf16", "fp32"])
@pytest.mark.parametrize("d, scale", [(64, 1.0), (768, 0.14)])
def test_checked_decoding_equals_the_fp32_argmax_on_both_paths(d, scale, path):
    """The null model's decoder gives nearest_tokens' ids on either first pass, also for vectors planted near ties
    (halfway between two tokens, 1e-4 off); within 1e-6 of a tie, where fp32 rounding decides, both paths agree."""
    g = torch.Generator().manual_seed(d)
    vocab = torch.randn(50257, d, generator=g) * scale
    near_ties = F.normalize(vocab[:64], dim=-1) + F.normalize(vocab[64:128], dim=-1)
    vectors = torch.cat([torch.randn(448, d, generator=g), near_ties + 1e-4 * torch.randn(64, d, generator=g)])
    closer = near_ties + 1e-6 * torch.randn(64, d, generator=g)
    expected, _ = nearest_tokens(vectors, vocab)
    decode = CheckedNearestTokens(vocab, block_rows=250, path=path)  # blocks of 250 rows, the last one shorter
    decode._pairs = decode._pairs[:, :10]  # the candidates' buffer must grow
    assert decode.path == path and torch.equal(decode(vectors), expected)
    if path == "fp32":
        assert torch.equal(decode(closer), CheckedNearestTokens(vocab, path="bf16")(closer))


def test_both_paths_give_the_same_ids_at_exact_ties():
    """Two identical vocabulary rows: both paths keep both and pick the lower id, as nearest_tokens does."""
    g = torch.Generator().manual_seed(0)
    vocab = torch.randn(1000, 32, generator=g)
    vocab[900] = vocab[100]
    vectors = torch.cat([vocab[100:101] + 0.01 * torch.randn(20, 32, generator=g), torch.randn(300, 32, generator=g)])
    ids = {path: CheckedNearestTokens(vocab, path=path)(vectors) for path in ("bf16", "fp32")}
    assert torch.equal(ids["bf16"], ids["fp32"]) and torch.equal(ids["fp32"], nearest_tokens(vectors, vocab)[0])
    assert (ids["fp32"][:20] == 100).all()


def test_the_environment_forces_a_path(monkeypatch):
    vocab = torch.randn(100, 8)
    for path in ("bf16", "fp32"):
        monkeypatch.setenv(DECODE_ENV, path)
        assert CheckedNearestTokens(vocab).path == path
    monkeypatch.setenv(DECODE_ENV, "fp16")
    with pytest.raises(UserError, match="AMAX_LIGHTNING_DECODE 'fp16' is not one of auto, bf16, fp32"):
        CheckedNearestTokens(vocab)


def test_auto_is_fp32_without_bf16_kernels(monkeypatch):
    monkeypatch.setattr(decode_module, "native_bf16_matmul", lambda device: False)
    assert CheckedNearestTokens(torch.randn(100, 8), path="auto").path == "fp32"


@pytest.mark.parametrize("fp32_seconds, bf16_seconds, chosen", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"),
                                                                (0.5, 2.0, "fp32")])
def test_auto_times_both_paths_and_keeps_the_faster(monkeypatch, fp32_seconds, bf16_seconds, chosen):
    """A planted clock: blocks alternate fp32, bf16; the first of each (a warm-up, planted 100x slower) is not
    counted; bf16 must be below 0.9 of fp32; every block's ids are the argmax whichever path decoded it."""
    monkeypatch.setattr(decode_module, "native_bf16_matmul", lambda device: True)
    durations = [100 * fp32_seconds, 100 * bf16_seconds] + [fp32_seconds, bf16_seconds] * 2 + [0.0] * 10
    clock = iter(np.cumsum([0.0] + [x for d in durations for x in (d, 0.0)]))
    monkeypatch.setattr(decode_module, "_now", lambda device: float(next(clock)))
    vocab, vectors = torch.randn(500, 16), torch.randn(8 * 32 + 5, 16)
    decode = CheckedNearestTokens(vocab, block_rows=32, path="auto")
    assert decode.path is None
    assert torch.equal(decode(vectors), nearest_tokens(vectors, vocab)[0])
    assert decode.path == chosen and decode.verdict["path"] == chosen
    assert decode.verdict["fp32_seconds_per_block"] == fp32_seconds and list(decode._first_pass) == [chosen]


def test_device_kind_names_the_cpu():
    kind = device_kind("cpu")
    assert kind["device"] == "cpu" and kind["name"] and kind["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(kind["native_bf16_matmul"], bool) and kind["threads"] == torch.get_num_threads()


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
