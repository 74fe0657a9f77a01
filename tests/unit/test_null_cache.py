"""The null distribution is computed once per vocabulary and settings, kept on disk, and never trusted blindly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import amax_lightning.null_model as null_model
from amax_lightning.null_model import cache_folder, cached_null_token_distribution, null_token_distribution

VOCAB = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))


def cached(folder, **options):
    return cached_null_token_distribution(VOCAB, 2000, scale=0.5, seed=0, chunk_rows=256, folder=str(folder), **options)


def test_cache_gives_the_computed_distribution_and_is_used_on_the_second_run(tmp_path, monkeypatch):
    fresh = null_token_distribution(VOCAB, 2000, scale=0.5, seed=0, chunk_rows=256)
    first = cached(tmp_path)
    assert np.array_equal(first, fresh) and len(list(tmp_path.glob("null-*.npz"))) == 1
    monkeypatch.setattr(null_model, "null_token_counts", lambda *a, **k: pytest.fail("recomputed"))
    assert np.array_equal(cached(tmp_path), fresh)


def test_another_vocabulary_or_sample_count_is_another_entry(tmp_path):
    cached(tmp_path)
    other = VOCAB.clone()
    other[7, 3] += 1e-3
    cached_null_token_distribution(other, 2000, scale=0.5, seed=0, chunk_rows=256, folder=str(tmp_path))
    cached_null_token_distribution(VOCAB, 1000, scale=0.5, seed=0, chunk_rows=256, folder=str(tmp_path))
    assert len(list(tmp_path.glob("null-*.npz"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign key", "wrong counts", "pickle"])
def test_corrupt_or_foreign_files_are_rebuilt(tmp_path, damage):
    expected = cached(tmp_path)
    (path,) = tmp_path.glob("null-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "foreign key":
        np.savez(path, key=np.array("someone else's"), counts=np.zeros(300, dtype=np.int64))
    elif damage == "wrong counts":
        key = str(np.load(path)["key"])
        np.savez(path, key=np.array(key), counts=np.full(300, 1, dtype=np.int64))  # sums to 300, not 2000
    else:
        np.savez(path, key=np.array([{"a": 1}], dtype=object), counts=np.zeros(1))
    assert np.array_equal(cached(tmp_path), expected)
    key = str(np.load(path)["key"])
    assert key == null_model.null_cache_key(VOCAB, 2000, 0.5, 0, 256)  # rewritten with the right entry


def test_an_unwritable_cache_only_costs_the_recomputation(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    assert np.array_equal(cached(blocked), null_token_distribution(VOCAB, 2000, scale=0.5, seed=0, chunk_rows=256))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AMAX_LIGHTNING_CACHE", str(tmp_path / "mine"))
    assert cache_folder() == str(tmp_path / "mine")
    monkeypatch.delenv("AMAX_LIGHTNING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == str(tmp_path / "xdg" / "amax_lightning")
