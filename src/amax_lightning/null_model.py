"""A null model for token uniqueness: how many distinct tokens would n *random* vectors decode to?

The study decodes n optimized vectors to their nearest vocabulary tokens and counts distinct ids. Whether
"48 of 50 unique" is more or fewer repeats than chance depends on how concentrated nearest-token decoding
is: some tokens are hubs that many directions land on. The null here is "each vector decodes like a random
start point": draw ``n_samples`` directions as the initial embeddings are drawn (``randn(d_model) * scale``),
decode them to their nearest token by cosine (``decode.CheckedNearestTokens``: the answer of
:func:`amax_lightning.decode.nearest_tokens`, from a bf16 matmul checked in fp32), and take the empirical token
frequencies ``p``.

Under the null, n vectors decode i.i.d. from ``p``. Then

* ``E[n_unique] = sum_v 1 - (1 - p_v)^n`` exactly (for this ``p``), and
* the one-sided p-value ``P(n_unique <= observed)`` (small = fewer distinct tokens than chance, i.e. evidence
  that the optimum is a stable feature) is estimated by Monte Carlo.

Caveat: ``p`` is an estimate. Tokens never hit in ``n_samples`` draws get probability 0, so the expectation
is slightly biased low when ``n_samples`` is not much larger than the number of tokens with real mass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from amax_lightning.checks import check_int
from amax_lightning.decode import CheckedNearestTokens
from amax_lightning.errors import UserError
from amax_lightning.runs import write_atomic

_SIM_CHUNK = 4096  # simulated studies held in memory at once; fixed so results do not depend on memory


@dataclass(frozen=True)
class NullModelResult:
    """The null model's answer for one study.

    Attributes
    ----------
    n_vectors
        Vectors per study (seeds x tokens, e.g. 50).
    n_samples
        Random directions decoded to estimate the null token distribution; 0 when the distribution is exact
        (token search: uniform over the allowed tokens, as its initial tokens are drawn).
    expected_n_unique
        Exact ``E[n_unique]`` for ``n_vectors`` i.i.d. draws from the estimated distribution.
    observed_n_unique
        The study's distinct-token count, or None if none was given.
    p_value
        ``P(n_unique <= observed)`` under the null, Monte Carlo with the ``(k + 1) / (N + 1)`` convention
        (exactly 1.0 when ``observed`` is at least the largest possible count); None without an observation.
    n_simulations
        Monte Carlo studies simulated for the p-value (0 when none were needed).
    p_value_se
        Binomial standard error of the Monte Carlo p-value, ``sqrt(p (1 - p) / N)``; None without an observation.
    """

    n_vectors: int
    n_samples: int
    expected_n_unique: float
    observed_n_unique: int | None
    p_value: float | None
    n_simulations: int
    p_value_se: float | None = None



def _check_distribution(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise UserError(f"distribution p has shape {p.shape}; it must be a non-empty 1-D array")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise UserError("distribution p has negative or non-finite entries; probabilities must be >= 0")
    if not math.isclose(float(p.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
        raise UserError(f"distribution p sums to {float(p.sum())!r}; it must sum to 1")
    return p


def null_token_distribution(
    vocab: torch.Tensor, n_samples: int, scale: float = 1.0, seed: int = 0, chunk_rows: int = 1024
) -> np.ndarray:
    """Empirical nearest-token distribution of random directions drawn like the initial embeddings.

    ``null_token_counts`` divided by ``n_samples``; see there for the parameters.
    """
    return null_token_counts(vocab, n_samples, scale, seed, chunk_rows) / n_samples


def null_token_counts(
    vocab: torch.Tensor, n_samples: int, scale: float = 1.0, seed: int = 0, chunk_rows: int = 1024
) -> np.ndarray:
    """How many of ``n_samples`` random directions, drawn like the initial embeddings, decode to each token.

    Parameters
    ----------
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model), e.g. ``Backbone.vocab_embeddings``.
    n_samples
        Number of random vectors to decode (count, >= 1). The estimate's resolution is ``1 / n_samples``.
    scale
        Standard deviation of each coordinate (embedding units; the study uses ``std(wte)``). Decoding by
        cosine ignores the scale; it is kept so the draws match the study's start points.
    seed
        Seed of the CPU ``torch.Generator`` that draws the vectors.
    chunk_rows
        Vectors drawn and decoded at once (count, >= 1); bounds memory. The draws, and so ``p``, depend on it.

    Returns
    -------
    numpy.ndarray
        Shape (V,), int64, summing to ``n_samples``: the samples decoded to each token id.
    """
    if not isinstance(vocab, torch.Tensor) or vocab.ndim != 2 or 0 in vocab.shape:
        raise UserError(f"vocab has shape {getattr(vocab, 'shape', None)}; it must be a non-empty (V, d_model) tensor")
    n_samples = check_int("n_samples", n_samples, 1)
    chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"scale {scale!r} is out of range; it must be a finite number > 0")
    decode = CheckedNearestTokens(vocab)
    generator = torch.Generator().manual_seed(int(seed))
    counts = torch.zeros(vocab.shape[0], dtype=torch.int64)
    for start in range(0, n_samples, chunk_rows):
        rows = min(chunk_rows, n_samples - start)
        vectors = torch.randn(rows, vocab.shape[1], generator=generator) * scale
        counts += torch.bincount(decode(vectors.to(vocab.device)).cpu(), minlength=vocab.shape[0])
    return counts.numpy()


CACHE_ENV = "AMAX_LIGHTNING_CACHE"
_CACHE_FORMAT = 3  # bump when the draws, the decoding or the key change (2: bf16 checked in fp32; 3: sha256 key)


def cache_folder() -> str:
    """Where null distributions are kept: ``$AMAX_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/amax_lightning``, else
    ``~/.cache/amax_lightning``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "amax_lightning")


def null_cache_key(vocab: torch.Tensor, n_samples: int, scale: float, seed: int, chunk_rows: int) -> str:
    """A content hash of the vocabulary matrix (fp32 bytes and shape) and of every setting the counts depend on."""
    digest = hashlib.sha256()  # hardware-accelerated on most CPUs: 0.08 s for GPT-2's 154 MB
    settings = {"format": _CACHE_FORMAT, "shape": list(vocab.shape), "n_samples": int(n_samples),
                "scale": float(scale), "seed": int(seed), "chunk_rows": int(chunk_rows),
                "device": vocab.device.type}  # fp32 sums differ by device in the last bits: near-ties may too
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(vocab.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _cached_counts(path: str, key: str, n_tokens: int, n_samples: int) -> np.ndarray | None:
    """The counts stored at ``path`` if the file is ours, for this key, and well formed; else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            counts = np.asarray(stored["counts"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = counts.shape == (n_tokens,) and counts.dtype == np.int64 and counts.min(initial=0) >= 0
    return counts if ok and int(counts.sum()) == n_samples else None


def cached_null_token_distribution(
    vocab: torch.Tensor, n_samples: int, scale: float = 1.0, seed: int = 0, chunk_rows: int = 1024,
    folder: str | None = None,
) -> np.ndarray:
    """``null_token_distribution``, computed once per vocabulary and settings and kept in ``cache_folder()``.

    The file is named by ``null_cache_key`` and holds the key itself; a corrupt, foreign or malformed file is
    ignored and rebuilt, and a cache that cannot be written only costs the recomputation.
    """
    key = null_cache_key(vocab, n_samples, scale, seed, chunk_rows)
    path = os.path.join(folder or cache_folder(), f"null-{key}.npz")
    counts = _cached_counts(path, key, vocab.shape[0], n_samples)
    if counts is None:
        counts = null_token_counts(vocab, n_samples, scale, seed, chunk_rows)
        try:
            write_atomic(path, lambda tmp: np.savez(tmp, key=np.array(key), counts=counts))
        except OSError:
            pass
    return counts / n_samples


def expected_n_unique(p, n_vectors: int) -> float:
    """Exact expected number of distinct tokens among ``n_vectors`` i.i.d. draws from ``p``.

    Parameters
    ----------
    p
        Token probabilities, shape (V,), non-negative, summing to 1.
    n_vectors
        Draws (count, >= 1), e.g. seeds x tokens = 50.

    Returns
    -------
    float
        ``sum_v 1 - (1 - p_v)^n``, computed as ``-expm1(n * log1p(-p_v))`` for accuracy at small ``p_v``.
    """
    p = _check_distribution(p)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf is right: a certain token is always present
        return float(-np.expm1(n_vectors * np.log1p(-p)).sum())


def simulate_n_unique(p, n_vectors: int, n_simulations: int, seed: int = 0) -> np.ndarray:
    """Distinct-token counts of ``n_simulations`` simulated studies of ``n_vectors`` i.i.d. draws from ``p``.

    Parameters
    ----------
    p
        Token probabilities, shape (V,), non-negative, summing to 1.
    n_vectors
        Draws per simulated study (count, >= 1).
    n_simulations
        Simulated studies (count, >= 1).
    seed
        Seed of the ``numpy.random.default_rng`` generator.

    Returns
    -------
    numpy.ndarray
        Shape (n_simulations,), int64: each study's number of distinct tokens.
    """
    p = _check_distribution(p)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    n_simulations = check_int("n_simulations", n_simulations, 1)
    support = p[p > 0] / p[p > 0].sum()  # token identities do not matter, only their probabilities
    rng = np.random.default_rng(int(seed))
    out = np.empty(n_simulations, dtype=np.int64)
    for start in range(0, n_simulations, _SIM_CHUNK):
        rows = min(_SIM_CHUNK, n_simulations - start)
        draws = np.sort(rng.choice(support.size, size=(rows, n_vectors), p=support), axis=1)
        out[start : start + rows] = 1 + (np.diff(draws, axis=1) != 0).sum(axis=1)
    return out


def unique_count_p_value(p, n_vectors: int, observed: int, n_simulations: int = 10_000, seed: int = 0) -> tuple[float, float, int]:
    """One-sided Monte Carlo p-value ``P(n_unique <= observed)`` under i.i.d. draws from ``p``.

    Parameters
    ----------
    p
        Token probabilities, shape (V,), non-negative, summing to 1.
    n_vectors
        Draws per study (count, >= 1).
    observed
        The study's number of distinct tokens (count, 1..n_vectors).
    n_simulations
        Simulated studies (count, >= 1); the smallest reportable p-value is ``1 / (n_simulations + 1)``.
    seed
        Seed of the ``numpy.random.default_rng`` generator.

    Returns
    -------
    p_value, standard_error, n_simulated
        ``(k + 1) / (N + 1)`` with k the simulated studies with ``n_unique <= observed``, its binomial standard
        error, and N. When ``observed`` is at least the largest possible count ``min(n_vectors, tokens with
        p > 0)`` the probability is exactly 1: returns ``(1.0, 0.0, 0)`` without simulating.
    """
    p = _check_distribution(p)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    observed = check_int("observed n_unique", observed, 1, n_vectors)
    n_simulations = check_int("n_simulations", n_simulations, 1)
    if observed >= min(n_vectors, int((p > 0).sum())):
        return 1.0, 0.0, 0
    counts = simulate_n_unique(p, n_vectors, n_simulations, seed)
    k = int((counts <= observed).sum())
    p_value = (k + 1) / (n_simulations + 1)
    return p_value, math.sqrt(p_value * (1 - p_value) / n_simulations), n_simulations


def null_model(
    vocab: torch.Tensor,
    n_vectors: int,
    observed_n_unique: int | None = None,
    *,
    n_samples: int = 100_000,
    scale: float = 1.0,
    n_simulations: int = 10_000,
    seed: int = 0,
    chunk_rows: int = 1024,
) -> NullModelResult:
    """Expected distinct-token count, and the p-value of an observed one, under the random-direction null.

    Parameters
    ----------
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model), e.g. ``Backbone.vocab_embeddings``.
    n_vectors
        Vectors per study (count, >= 1): seeds x tokens, 50 in the study.
    observed_n_unique
        The study's distinct-token count (1..n_vectors), or None for the expectation only.
    n_samples
        Random directions decoded to estimate the null distribution (count, >= 1).
    scale
        Standard deviation per coordinate of the random directions (embedding units, e.g. ``std(wte)``).
    n_simulations
        Monte Carlo studies for the p-value (count, >= 1).
    seed
        Seeds both the direction draws (torch) and the Monte Carlo (numpy); same seed, same result.
    chunk_rows
        Directions drawn and decoded at once (count, >= 1).

    Returns
    -------
    NullModelResult
    """
    p = null_token_distribution(vocab, n_samples, scale=scale, seed=seed, chunk_rows=chunk_rows)
    expected = expected_n_unique(p, n_vectors)
    if observed_n_unique is None:
        check_int("n_simulations", n_simulations, 1)
        return NullModelResult(n_vectors, n_samples, expected, None, None, 0, None)
    p_value, se, n_sim = unique_count_p_value(p, n_vectors, observed_n_unique, n_simulations, seed)
    return NullModelResult(n_vectors, n_samples, expected, int(observed_n_unique), p_value, n_sim, se)
