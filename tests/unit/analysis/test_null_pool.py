"""The null pool is decoded once per vocabulary and settings, kept on disk, extended when a study needs more, never
trusted blindly; the answer does not depend on what the cache held; which decode path is faster is remembered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import amax_lightning.analysis.null_model as null_model
from amax_lightning.analysis.null_model import sampled_null
from amax_lightning.analysis.null_pool import cache_folder, null_token_ids

VOCAB = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))


def pool(folder, max_samples=2000, **options):
    return sampled_null(VOCAB, 5, max_samples=max_samples, scale=0.5, n_simulations=500, chunk_rows=256,
                        folder=str(folder), path="fp32", **options)


def same(a, b) -> bool:
    return (a.n_samples, a.expected, a.expected_se) == (b.n_samples, b.expected, b.expected_se) and \
        np.array_equal(a.at_most, b.at_most) and np.array_equal(a.cdf_se, b.cdf_se)


@pytest.fixture
def never_precise(monkeypatch):
    """Every look at the errors asks for more directions: pools grow to ``max_samples``."""
    monkeypatch.setattr(null_model.PoolEstimates, "precise_enough", lambda self: False)


def test_cache_gives_the_computed_answer_and_is_used_on_the_second_run(tmp_path, monkeypatch, never_precise):
    fresh = pool(tmp_path, use_cache=False)
    assert fresh.n_samples == 2000 and not list(tmp_path.iterdir())
    assert same(pool(tmp_path), fresh) and len(list(tmp_path.glob("null-*.npz"))) == 1
    monkeypatch.setattr(null_model, "null_token_ids", lambda *a, **k: pytest.fail("decoded again"))
    assert same(pool(tmp_path), fresh)


def test_a_bigger_study_extends_the_pool_and_decodes_only_the_new_directions(tmp_path, monkeypatch, never_precise):
    pool(tmp_path, max_samples=700)
    decoded = []
    original = null_model.null_token_ids
    monkeypatch.setattr(null_model, "null_token_ids", lambda v, start, stop, *a, **k: decoded.append((start, stop))
                        or original(v, start, stop, *a, **k))
    extended = pool(tmp_path, max_samples=2000)
    assert decoded == [(700, 2000)]
    assert same(extended, pool(tmp_path / "cold", max_samples=2000))  # as if decoded in one go
    stored = np.load(next(tmp_path.glob("null-*.npz")))["ids"]
    assert np.array_equal(stored, null_token_ids(VOCAB, 0, 2000, 0.5, 0, 256))


def test_another_vocabulary_or_scale_is_another_entry(tmp_path):
    pool(tmp_path)
    other = VOCAB.clone()
    other[7, 3] += 1e-3
    sampled_null(other, 5, max_samples=2000, scale=0.5, n_simulations=500, chunk_rows=256, folder=str(tmp_path))
    sampled_null(VOCAB, 5, max_samples=2000, scale=0.25, n_simulations=500, chunk_rows=256, folder=str(tmp_path))
    assert len(list(tmp_path.glob("null-*.npz"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign key", "ids out of range", "pickle"])
def test_corrupt_or_foreign_files_are_rebuilt(tmp_path, damage):
    expected = pool(tmp_path)
    (path,) = tmp_path.glob("null-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "foreign key":
        np.savez(path, key=np.array("someone else's"), ids=np.zeros(5000, dtype=np.int32))
    elif damage == "ids out of range":
        key = str(np.load(path)["key"])
        np.savez(path, key=np.array(key), ids=np.full(5000, 300, dtype=np.int32))
    else:
        np.savez(path, key=np.array([{"a": 1}], dtype=object), ids=np.zeros(1))
    assert same(pool(tmp_path), expected)
    stored = np.load(path)
    assert str(stored["key"]) == null_model.null_cache_key(VOCAB, 0.5, 0, 256)  # rewritten with the right entry
    assert stored["ids"].max() < 300


def test_an_unwritable_cache_only_costs_the_recomputation(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    assert same(pool(blocked), pool(tmp_path / "fine"))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AMAX_LIGHTNING_CACHE", str(tmp_path / "mine"))
    assert cache_folder() == str(tmp_path / "mine")
    monkeypatch.delenv("AMAX_LIGHTNING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == str(tmp_path / "xdg" / "amax_lightning")


def test_the_faster_decode_path_is_remembered_per_machine(tmp_path, monkeypatch, never_precise):
    """On a machine with bf16 kernels the first pool times both paths (a planted clock: bf16 faster) and keeps the
    verdict; the next pool decodes on that path without timing. The ids are the same either way."""
    import amax_lightning.model.decode as decode

    monkeypatch.delenv(decode.DECODE_ENV, raising=False)  # auto, also when the suite runs with a path forced
    monkeypatch.setattr(decode, "native_bf16_matmul", lambda device: True)
    clock = iter(np.cumsum([0.0] + [1.0, 0.0, 0.5, 0.0] * 100))  # per block: start, end (fp32 1 s, bf16 0.5 s), ...
    monkeypatch.setattr(decode, "_now", lambda device: float(next(clock)))
    timed = sampled_null(VOCAB, 5, max_samples=2000, scale=0.5, n_simulations=500, chunk_rows=256,
                         folder=str(tmp_path))
    (verdict_file,) = tmp_path.glob("decode-*.json")
    verdict = json.loads(verdict_file.read_text())
    assert verdict["path"] == "bf16" and verdict["device"]["native_bf16_matmul"] is True
    assert null_model.pool_decoder(VOCAB, str(tmp_path)).path == "bf16"
    assert same(timed, pool(tmp_path / "fp32"))
