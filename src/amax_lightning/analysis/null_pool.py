"""The null model's pool: random directions drawn as the initial embeddings are, decoded to their nearest tokens.

Directions come ``chunk_rows`` at a time from generators keyed by (seed, chunk), so a pool of any size is the prefix
of a longer one. Decoded pools are cached on disk (``cache_folder``) under a content hash of the vocabulary and the
settings (``null_cache_key``), and so is the verdict of which decode path (bf16 or fp32) is faster here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable

import numpy as np
import torch

from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError
from amax_lightning.base.files import write_text_atomic
from amax_lightning.model.decode import CheckedNearestTokens, device_kind, requested_path
from amax_lightning.optimize.param import keyed_generator


def check_vocab(vocab) -> None:
    if not isinstance(vocab, torch.Tensor) or vocab.ndim != 2 or 0 in vocab.shape:
        raise UserError(f"vocab has shape {getattr(vocab, 'shape', None)}; it must be a non-empty (V, d_model) tensor")


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"scale {scale!r} is out of range; it must be a finite number > 0")
    return float(scale)


def null_token_ids(vocab: torch.Tensor, start: int, stop: int, scale: float = 1.0, seed: int = 0,
                   chunk_rows: int = 1024, decoder: CheckedNearestTokens | None = None,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Token ids of random directions ``start..stop-1``, drawn like the initial embeddings, decoded by cosine.

    Direction i is row ``i % chunk_rows`` of chunk ``i // chunk_rows``, ``randn(chunk_rows, d_model) * scale`` from
    the generator keyed by (seed, chunk): any range of the sequence is drawn on its own, so a pool can be extended.

    Parameters
    ----------
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model), e.g. ``Backbone.vocab_embeddings``.
    start, stop
        The directions' positions in the sequence (counts, 0 <= start <= stop).
    scale
        Standard deviation of each coordinate (embedding units; the study uses ``std(wte)``). Decoding by
        cosine ignores the scale; it is kept so the draws match the study's start points.
    seed
        Names the sequence of directions.
    chunk_rows
        Directions per drawn chunk (count, >= 1); the directions, and so the ids, depend on it.
    decoder
        A ``CheckedNearestTokens`` of ``vocab`` (made here when None).
    progress
        Called with the number of directions decoded after each chunk.

    Returns
    -------
    numpy.ndarray
        Shape (stop - start,), int64 token ids.
    """
    decoder = decoder or CheckedNearestTokens(vocab)
    ids = []
    for chunk in range(start // chunk_rows, -(-stop // chunk_rows)):
        vectors = torch.randn(chunk_rows, vocab.shape[1], generator=keyed_generator(seed, chunk)) * scale
        first, last = max(start, chunk * chunk_rows), min(stop, (chunk + 1) * chunk_rows)
        rows = vectors[first - chunk * chunk_rows : last - chunk * chunk_rows]
        ids.append(decoder(rows.to(vocab.device)).cpu().numpy())
        if progress is not None:
            progress(last - first)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def null_token_counts(vocab: torch.Tensor, n_samples: int, scale: float = 1.0, seed: int = 0,
                      chunk_rows: int = 1024) -> np.ndarray:
    """How many of the first ``n_samples`` random directions (``null_token_ids``) decode to each token.

    Returns shape (V,), int64, summing to ``n_samples``.
    """
    check_vocab(vocab)
    n_samples = check_int("n_samples", n_samples, 1)
    chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    ids = null_token_ids(vocab, 0, n_samples, check_scale(scale), seed, chunk_rows)
    return np.bincount(ids, minlength=vocab.shape[0]).astype(np.int64)


def null_token_distribution(vocab: torch.Tensor, n_samples: int, scale: float = 1.0, seed: int = 0,
                            chunk_rows: int = 1024) -> np.ndarray:
    """Empirical nearest-token distribution of random directions: ``null_token_counts / n_samples``."""
    return null_token_counts(vocab, n_samples, scale, seed, chunk_rows) / n_samples


CACHE_ENV = "AMAX_LIGHTNING_CACHE"


_CACHE_FORMAT = 4  # bump when the draws, the decoding or the key change (4: directions keyed by chunk, ids stored)


def cache_folder() -> str:
    """Where null pools are kept: ``$AMAX_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/amax_lightning``, else
    ``~/.cache/amax_lightning``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "amax_lightning")


def null_cache_key(vocab: torch.Tensor, scale: float, seed: int, chunk_rows: int) -> str:
    """A content hash of the vocabulary matrix (fp32 bytes and shape) and of every setting the ids depend on."""
    digest = hashlib.sha256()  # hardware-accelerated on most CPUs: 0.08 s for GPT-2's 154 MB
    settings = {"format": _CACHE_FORMAT, "shape": list(vocab.shape), "scale": float(scale), "seed": int(seed),
                "chunk_rows": int(chunk_rows), "device": vocab.device.type}  # device sums differ in the last bits
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(vocab.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def cached_pool(path: str, key: str, n_tokens: int) -> np.ndarray:
    """The pool stored at ``path`` if the file is ours, for this key, and well formed; else an empty pool."""
    empty = np.zeros(0, dtype=np.int64)
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return empty
            ids = np.asarray(stored["ids"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return empty
    ok = ids.ndim == 1 and ids.dtype == np.int32 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < n_tokens))
    return ids.astype(np.int64) if ok else empty


def _decode_verdict_path(folder: str, vocab: torch.Tensor, block_rows: int) -> str:
    """The file remembering which decode path is faster on this machine, for this shape."""
    kind = {**device_kind(vocab.device), "shape": list(vocab.shape), "block_rows": block_rows}
    return os.path.join(folder, f"decode-{hashlib.sha256(json.dumps(kind, sort_keys=True).encode()).hexdigest()[:16]}.json")


def pool_decoder(vocab: torch.Tensor, folder: str | None, path: str | None = None) -> CheckedNearestTokens:
    """A ``CheckedNearestTokens`` on the path asked for (``path``, else ``$AMAX_LIGHTNING_DECODE``), else on the
    one this machine was found faster on before (kept in ``folder``), else one that times both."""
    decoder_path = requested_path(path)
    if decoder_path == "auto" and folder is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(_decode_verdict_path(folder, vocab, 256)) as handle:
                remembered = json.load(handle)["path"]
            decoder_path = remembered if remembered in ("bf16", "fp32") else "auto"
    return CheckedNearestTokens(vocab, path=decoder_path)


def remember_decode_verdict(decoder: CheckedNearestTokens, vocab: torch.Tensor, folder: str) -> None:
    if decoder.verdict is not None:
        text = json.dumps({**decoder.verdict, "device": device_kind(vocab.device)}, indent=1)
        with contextlib.suppress(OSError):
            write_text_atomic(_decode_verdict_path(folder, vocab, decoder.block_rows), text)
