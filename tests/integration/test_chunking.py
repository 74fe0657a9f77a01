"""Chunked steps: rows run in chunks give the same optimization as one batch; chunk sizes follow measured memory."""

from __future__ import annotations

import pytest
import torch

import amax_lightning.model.chunking as chunking

SWEEP = "blocks.1.mlp.hook_post:3,17,40"  # 3 units x 2 seeds = 6 rows
SEEDS = [0, 3]


@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_chunked_steps_equal_one_batch(fit_tiny, chunk_rows):
    whole, whole_results = fit_tiny("whole", target=SWEEP, seeds=SEEDS, lr=1e-2, steps=12, chunk_rows=6)
    chunked, chunked_results = fit_tiny("chunked", target=SWEEP, seeds=SEEDS, lr=1e-2, steps=12, chunk_rows=chunk_rows)
    assert whole.chunk_rows_used == 6 and chunked.chunk_rows_used == chunk_rows
    torch.testing.assert_close(chunked.parameter.detach(), whole.parameter.detach(), rtol=1e-5, atol=1e-6)
    _, whole_history = whole.activation_history()
    _, chunked_history = chunked.activation_history()
    torch.testing.assert_close(chunked_history, whole_history, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole_results["units"], chunked_results["units"]):
        assert [r["token_ids"] for r in a["runs"]] == [r["token_ids"] for r in b["runs"]]
        assert a["uniqueness"] == b["uniqueness"]


def test_chunked_steps_keep_prior_penalties(fit_tiny):
    priors = "vocab_distance=0.5,clamp"
    whole, _ = fit_tiny("whole", target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=6, steps=6, priors=priors)
    chunked, _ = fit_tiny("chunked", target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=4, steps=6, priors=priors)
    torch.testing.assert_close(chunked.parameter.detach(), whole.parameter.detach(), rtol=1e-5, atol=1e-6)


def test_automatic_chunks_follow_free_memory(fit_tiny, tiny_module, monkeypatch, caplog):
    probe = tiny_module(target=SWEEP, seeds=SEEDS)
    per_row = chunking.saved_bytes_per_row(lambda n: probe.objective(probe.parameter[:n], slice(0, n)).loss.sum())
    monkeypatch.setattr(chunking, "free_memory_bytes", lambda device: 2 * 2 * per_row)  # half of it: 2 rows
    module, results = fit_tiny("auto", target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=0, steps=3)
    assert module.chunk_rows_used == 2
    assert "running 6 rows as 3 chunks of 2 rows" in caplog.text
    assert results["units"][0]["numerics"]["chunk_rows"] == 2

    monkeypatch.setattr(chunking, "free_memory_bytes", lambda device: None)  # unknown: one chunk
    module, _ = fit_tiny("unknown", target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=0, steps=1)
    assert module.chunk_rows_used == 6

    monkeypatch.setattr(chunking, "CPU_CHUNK_TOKENS", 3 * 5)  # on CPU: at most the fastest chunk, 3 rows of 5 tokens
    module, _ = fit_tiny("fastest", target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=0, steps=1)
    assert module.chunk_rows_used == 3
