"""A null model for token uniqueness: how many distinct tokens would n *random* vectors decode to?

The study decodes n optimized vectors to their nearest vocabulary tokens and counts distinct ids. Whether
"48 of 50 unique" is more or fewer repeats than chance depends on how concentrated nearest-token decoding
is: some tokens are hubs that many directions land on. The null here is "each vector decodes like a random
start point": directions drawn as the initial embeddings are drawn (``randn(d_model) * scale``), decoded to their
nearest token by cosine (``decode.CheckedNearestTokens``: the ids of :func:`amax_lightning.model.decode.nearest_tokens`).

A pool of N decoded directions answers both questions without bias (:func:`pool_estimates`): n vectors of a
study are n i.i.d. null draws, and so are n distinct directions of the pool. So

* ``E[n_unique]`` is the mean distinct count over every n-subset of the pool, in closed form
  (``sum_v 1 - C(N - c_v, n) / C(N, n)``, c_v the directions decoded to token v), and
* the one-sided p-value ``P(n_unique <= observed)`` (small = fewer distinct tokens than chance, i.e. evidence
  that the optimum is a stable feature) is the share of ``n_simulations`` random n-subsets of the pool with that
  few distinct tokens, Monte Carlo.

(Drawing the n with replacement from the pool's frequencies, as this module did before, counts a direction drawn
twice as a repeat: on a vocabulary where random directions rarely share a token that biases E low by about
n^2 / 2N and the p-value of ``n - 1`` unique up several-fold.)

**How many directions.** Decoding is the cost (one (N, d) x (d, V) matmul). Directions are added ``chunk_rows`` at
a time until both estimates are as precise as the answer needs, at most ``max_samples`` (:data:`EXPECTED_SE`,
:data:`P_VALUE_SE`). Their standard errors come from ``GROUPS`` disjoint groups of the pool: each group's
estimate is unbiased, their spread over sqrt(GROUPS) is the standard error of the groups' mean, and the full
pool's estimate (the average over all n-subsets, so the groups' mean averaged over the pool's orderings) varies
at most as much: the reported errors are upper bounds, Monte Carlo noise included.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from amax_lightning.analysis.null_pool import (
    cache_folder,
    cached_pool,
    check_scale,
    check_vocab,
    null_cache_key,
    null_token_ids,
    pool_decoder,
    remember_decode_verdict,
)
from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError
from amax_lightning.base.files import write_atomic
from amax_lightning.base.progress import Progress

_SIM_CHUNK = 4096  # simulated studies held in memory at once; fixed so results do not depend on memory
MAX_POOL = 1_000_000  # random directions in one null pool: about 2 minutes of decoding on 2 CPU cores


@dataclass(frozen=True)
class NullModelResult:
    """The null model's answer for one study.

    Attributes
    ----------
    n_vectors
        Vectors per study (seeds x tokens, e.g. 50).
    n_samples
        Random directions decoded (the pool); 0 when the distribution is exact (token search: uniform over the
        allowed tokens, as its initial tokens are drawn).
    expected_n_unique
        ``E[n_unique]`` for ``n_vectors`` i.i.d. draws: from the pool (``subset_expected_n_unique``), or exact.
    observed_n_unique
        The study's distinct-token count, or None if none was given.
    p_value
        ``P(n_unique <= observed)`` under the null, Monte Carlo with the ``(k + 1) / (N + 1)`` convention
        (exactly 1.0 when ``observed`` is at least the largest possible count); None without an observation.
    n_simulations
        Monte Carlo studies simulated for the p-value (0 when none were needed).
    p_value_se
        Standard error of the p-value: from the pool's groups (``pool_estimates``), at least the binomial
        ``sqrt(p (1 - p) / N)`` of the Monte Carlo; None without an observation.
    expected_n_unique_se
        Standard error of ``expected_n_unique`` (tokens; 0 when exact); None for results made before it existed.
    """

    n_vectors: int
    n_samples: int
    expected_n_unique: float
    observed_n_unique: int | None
    p_value: float | None
    n_simulations: int
    p_value_se: float | None = None
    expected_n_unique_se: float | None = None


def _check_distribution(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise UserError(f"distribution p has shape {p.shape}; it must be a non-empty 1-D array")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise UserError("distribution p has negative or non-finite entries; probabilities must be >= 0")
    if not math.isclose(float(p.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
        raise UserError(f"distribution p sums to {float(p.sum())!r}; it must sum to 1")
    return p


GROUPS = 10  # disjoint groups of the pool whose spread gives the standard errors
EXPECTED_SE = 0.05  # tokens: E[n_unique] to a twentieth of a token (observed counts are whole tokens)
P_VALUE_SE = 0.005  # wherever the p-value is <= P_VALUE_REGION: a tenth of the 0.05 threshold
P_VALUE_REGION = 0.1
FIRST_SAMPLES = 2048  # directions decoded before the first look at the errors (at least GROUPS x n_vectors)
GROUP_STUDIES = 2000  # random n-subsets per group at least: their noise alone stays below P_VALUE_SE / 2
PROGRESS_DELAY = 2.0  # seconds of decoding before the progress bar shows


def subset_expected_n_unique(counts, n_vectors: int) -> float:
    """Mean distinct-token count over every ``n_vectors``-subset of a pool with ``counts[v]`` members of token v.

    ``sum_v 1 - C(N - c_v, n) / C(N, n)`` (N the pool size, at least ``n_vectors``): the chance that an n-subset
    misses token v is hypergeometric. Unbiased for ``E[n_unique]`` of n i.i.d. draws from the pool's source.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total, n = int(counts.sum()), int(n_vectors)
    if n > total:
        raise UserError(f"a pool of {total} directions cannot hold {n} vectors")
    values, multiplicity = np.unique(counts[counts > 0], return_counts=True)
    log_all = math.lgamma(total + 1) - math.lgamma(total - n + 1)
    miss = [math.exp(math.lgamma(total - c + 1) - math.lgamma(total - c - n + 1) - log_all) if total - c >= n else 0.0
            for c in values.tolist()]
    return float(np.dot(multiplicity, 1.0 - np.asarray(miss)))


def subset_n_unique(ids: np.ndarray, n_vectors: int, n_studies: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct-token counts of ``n_studies`` uniformly random ``n_vectors``-subsets of the pool ``ids``.

    Each shuffle of the pool is cut into ``len(ids) // n_vectors`` disjoint subsets (each one uniformly random).
    Returns shape (n_studies,), int64.
    """
    per_shuffle = len(ids) // n_vectors
    out, done = np.empty(n_studies, dtype=np.int64), 0
    while done < n_studies:
        shuffles = min(-(-(n_studies - done) // per_shuffle), max(1, _SIM_CHUNK * n_vectors // len(ids)))
        pools = rng.permuted(np.broadcast_to(ids, (shuffles, len(ids))), axis=1)
        studies = np.sort(pools[:, : per_shuffle * n_vectors].reshape(-1, n_vectors), axis=1)
        rows = min(len(studies), n_studies - done)
        out[done : done + rows] = 1 + (np.diff(studies[:rows], axis=1) != 0).sum(axis=1)
        done += rows
    return out


@dataclass(frozen=True)
class PoolEstimates:
    """What a pool of decoded random directions says about studies of ``n_vectors`` vectors.

    Attributes
    ----------
    n_vectors, n_samples
        Vectors per study; directions in the pool.
    expected, expected_se
        ``E[n_unique]`` (``subset_expected_n_unique``) and its standard error (tokens).
    at_most, n_simulations
        ``at_most[k]``: of ``n_simulations`` random n-subsets of the pool, how many had at most k distinct tokens
        (k = 0..n_vectors).
    cdf_se
        ``cdf_se[k]``: standard error of ``P(n_unique <= k)`` estimated from the pool.
    """

    n_vectors: int
    n_samples: int
    expected: float
    expected_se: float
    at_most: np.ndarray
    n_simulations: int
    cdf_se: np.ndarray

    def precise_enough(self) -> bool:
        """Errors within ``EXPECTED_SE`` and, wherever ``P(n_unique <= k) <= P_VALUE_REGION``, ``P_VALUE_SE``."""
        near = self.at_most / self.n_simulations <= P_VALUE_REGION
        return self.expected_se <= EXPECTED_SE and bool(np.all(self.cdf_se[near] <= P_VALUE_SE))

    def result(self, observed: int | None) -> NullModelResult:
        """The ``NullModelResult`` for an observed distinct count (1..n_vectors) or None (the expectation only)."""
        if observed is None:
            return NullModelResult(self.n_vectors, self.n_samples, self.expected, None, None, 0, None, self.expected_se)
        observed = check_int("observed n_unique", observed, 1, self.n_vectors)
        p_value = (int(self.at_most[observed]) + 1) / (self.n_simulations + 1)
        if observed == self.n_vectors:
            p_value, se = 1.0, 0.0
        else:
            se = max(float(self.cdf_se[observed]), math.sqrt(p_value * (1 - p_value) / self.n_simulations))
        return NullModelResult(self.n_vectors, self.n_samples, self.expected, observed, min(p_value, 1.0),
                               self.n_simulations, se, self.expected_se)


def pool_estimates(ids: np.ndarray, n_vectors: int, n_simulations: int = 10_000, seed: int = 0) -> PoolEstimates:
    """``E[n_unique]`` and ``P(n_unique <= k)`` for every k from a pool of decoded directions, with their errors.

    Parameters
    ----------
    ids
        The pool: token ids of i.i.d. null directions, shape (N,), N at least ``GROUPS * n_vectors``.
    n_vectors
        Vectors per study (count, >= 1).
    n_simulations
        Random n-subsets of the whole pool for the p-values; each group draws ``max(GROUP_STUDIES, n_simulations /
        GROUPS)`` for the errors.
    seed
        Seed of the ``numpy.random.default_rng`` that draws the subsets.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    n_simulations = check_int("n_simulations", n_simulations, 1)
    if len(ids) < GROUPS * n_vectors:
        raise UserError(f"a null pool of {len(ids)} directions is too small for {n_vectors} vectors per study; "
                        f"it needs at least {GROUPS * n_vectors}")
    rng = np.random.default_rng(int(seed))
    k = np.arange(n_vectors + 1)
    at_most = (subset_n_unique(ids, n_vectors, n_simulations, rng)[:, None] <= k).sum(axis=0)
    size = len(ids) // GROUPS
    groups = [ids[g * size : (g + 1) * size] for g in range(GROUPS)]
    per_group = max(GROUP_STUDIES, -(-n_simulations // GROUPS))
    group_expected = [subset_expected_n_unique(np.bincount(group), n_vectors) for group in groups]
    group_cdf = [(subset_n_unique(group, n_vectors, per_group, rng)[:, None] <= k).mean(axis=0) for group in groups]
    return PoolEstimates(
        n_vectors, len(ids), subset_expected_n_unique(np.bincount(ids), n_vectors),
        float(np.std(group_expected, ddof=1) / math.sqrt(GROUPS)), at_most, n_simulations,
        np.std(group_cdf, axis=0, ddof=1) / math.sqrt(GROUPS))


def check_null_size(n_vectors: int) -> int:
    """The fewest random directions the null model needs for ``n_vectors`` vectors per study (``GROUPS`` x n); a
    UserError when that is more than ``MAX_POOL``. The CLI asks before the first step."""
    smallest = GROUPS * n_vectors
    if smallest > MAX_POOL:
        raise UserError(f"the null model for {n_vectors} vectors per study needs {smallest} random directions, more "
                        f"than {MAX_POOL}; turn it off with results.null_samples 0")
    return smallest


def sampled_null(vocab: torch.Tensor, n_vectors: int, *, max_samples: int = 20_000, scale: float = 1.0,
                 n_simulations: int = 10_000, seed: int = 0, chunk_rows: int = 1024, folder: str | None = None,
                 use_cache: bool = True, path: str | None = None, progress: bool = True) -> PoolEstimates:
    """The null for studies of ``n_vectors`` vectors, from as many random directions as its precision needs.

    Directions are decoded ``chunk_rows`` at a time, from ``max(GROUPS * n_vectors, min(FIRST_SAMPLES,
    max_samples))`` on, until ``PoolEstimates.precise_enough`` or ``max_samples`` (but never fewer than
    ``GROUPS * n_vectors``); the looks at the errors come at fixed pool sizes, so the answer does not depend on the
    cache. The decoded pool is kept in ``folder`` (default ``cache_folder()``; ``use_cache`` False: nowhere) under
    ``null_cache_key`` and extended when a later study needs more. A first run that takes more than 2 s shows a
    progress line on stderr (``PROGRESS_DELAY``; ``progress`` False: none, e.g. on ranks other than 0). ``path`` forces the decoder's first pass (``decode.CheckedNearestTokens``).
    """
    check_vocab(vocab)
    n_vectors = check_int("n_vectors", n_vectors, 1)
    max_samples = check_int("max_samples", max_samples, 1)
    chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    scale = check_scale(scale)
    smallest = check_null_size(n_vectors)
    looks = sorted({max(smallest, min(FIRST_SAMPLES, max_samples)), max(smallest, max_samples)})
    looks = [*range(looks[0], looks[-1], chunk_rows), looks[-1]]
    folder = (folder or cache_folder()) if use_cache else None
    key = null_cache_key(vocab, scale, seed, chunk_rows)
    file = os.path.join(folder, f"null-{key}.npz") if folder else None
    ids = cached_pool(file, key, vocab.shape[0]) if file else np.zeros(0, dtype=np.int64)
    stored, decoder, bar = len(ids), None, None
    try:
        for size in looks:
            if size > len(ids):
                if decoder is None:
                    decoder = pool_decoder(vocab, folder, path)
                    bar = Progress("null model: random directions decoded (kept for the next run)", looks[-1],
                                   "directions", enabled=progress, done=len(ids), delay_s=PROGRESS_DELAY)
                ids = np.concatenate([ids, null_token_ids(vocab, len(ids), size, scale, seed, chunk_rows, decoder,
                                                          progress=bar.advance)])
            estimates = pool_estimates(ids[:size], n_vectors, n_simulations, seed)
            if estimates.precise_enough():
                break
    finally:
        if bar is not None:
            bar.close()
    if file and len(ids) > stored:
        with contextlib.suppress(OSError):
            write_atomic(file, lambda tmp: np.savez(tmp, key=np.array(key), ids=ids.astype(np.int32)))
    if decoder is not None and folder:
        remember_decode_verdict(decoder, vocab, folder)
    return estimates


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
    n_samples: int = 20_000,
    scale: float = 1.0,
    n_simulations: int = 10_000,
    seed: int = 0,
    chunk_rows: int = 1024,
) -> NullModelResult:
    """Expected distinct-token count, and the p-value of an observed one, under the random-direction null.

    ``sampled_null`` without the cache: ``n_samples`` is the most random directions decoded (fewer when the
    estimates are precise enough). ``observed_n_unique`` is the study's distinct-token count (1..n_vectors), or None
    for the expectation only; the other parameters are ``sampled_null``'s.
    """
    estimates = sampled_null(vocab, n_vectors, max_samples=n_samples, scale=scale, n_simulations=n_simulations,
                             seed=seed, chunk_rows=chunk_rows, use_cache=False)
    return estimates.result(observed_n_unique)
