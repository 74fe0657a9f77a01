"""The null model on planted distributions with known answers, reproducibility, and bad inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import amax_lightning.analysis.null_model as null_model_module
from amax_lightning.analysis.null_model import (
    GROUPS,
    NullModelResult,
    PoolEstimates,
    expected_n_unique,
    null_model,
    pool_estimates,
    sampled_null,
    simulate_n_unique,
    subset_expected_n_unique,
    subset_n_unique,
    unique_count_p_value,
)
from amax_lightning.analysis.null_pool import null_token_distribution, null_token_ids
from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import load_backbone


def _zipf(n_tokens: int, exponent: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_tokens + 1) ** exponent
    return weights / weights.sum()


def test_exact_expectation_matches_a_direct_simulation():
    p = _zipf(1000)
    rng = np.random.default_rng(123)  # an independent simulation, not the module's sampler
    counts = [np.unique(rng.choice(p.size, size=50, p=p)).size for _ in range(20_000)]
    assert expected_n_unique(p, 50) == pytest.approx(np.mean(counts), abs=4 * np.std(counts) / np.sqrt(20_000))
    assert np.mean(simulate_n_unique(p, 50, 20_000, seed=1)) == pytest.approx(expected_n_unique(p, 50), abs=0.1)


def test_expectation_closed_forms():
    assert expected_n_unique(np.full(10, 0.1), 1) == pytest.approx(1.0)
    assert expected_n_unique([1.0, 0.0], 50) == pytest.approx(1.0)
    assert expected_n_unique([0.5, 0.5], 3) == pytest.approx(2 * (1 - 0.5**3))
    uniform = np.full(100_000, 1e-5)
    assert expected_n_unique(uniform, 50) == pytest.approx(100_000 * -np.expm1(50 * np.log1p(-1e-5)))


def test_p_value_matches_the_exact_probability():
    # two equally likely tokens, 3 draws: P(n_unique <= 1) = 2 * (1/2)^3 = 1/4
    p_value, se, n_sim = unique_count_p_value([0.5, 0.5], 3, observed=1, n_simulations=20_000, seed=0)
    assert n_sim == 20_000 and se == pytest.approx(np.sqrt(0.25 * 0.75 / 20_000), rel=0.05)
    assert abs(p_value - 0.25) < 4 * se


def test_concentrated_null_gives_p_value_one():
    p = np.zeros(1000)
    p[[7, 900]] = 0.5  # only 2 tokens possible: n_unique <= 2 always
    for observed in (2, 50):
        p_value, se, n_sim = unique_count_p_value(p, 50, observed=observed)
        assert (p_value, se, n_sim) == (1.0, 0.0, 0)
    p_value, _, _ = unique_count_p_value(p, 50, observed=1, n_simulations=1000)
    assert p_value == pytest.approx(1 / 1001)  # both tokens appear in every simulated study


def test_uniform_null_makes_40_of_50_unique_significant():
    p_value, _, _ = unique_count_p_value(np.full(100_000, 1e-5), 50, observed=40, n_simulations=2000)
    assert p_value == pytest.approx(1 / 2001)  # the smallest reportable: no simulated study is that repetitive
    # while 49 of 50 under a uniform null is unremarkable
    p_value, _, _ = unique_count_p_value(np.full(100_000, 1e-5), 50, observed=49, n_simulations=2000)
    assert p_value > 0.001


def test_null_distribution_on_a_planted_vocabulary_is_uniform():
    d = 4
    vocab = torch.cat([torch.eye(d), -torch.eye(d)])  # nearest of a random direction: its largest |coordinate|
    p = null_token_distribution(vocab, n_samples=40_000, scale=0.3, seed=0, chunk_rows=999)
    assert p.shape == (2 * d,) and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, 1 / (2 * d), atol=0.01)


def test_null_model_on_tiny_gpt2_is_reproducible(tiny_gpt2_dir):
    vocab = load_backbone(str(tiny_gpt2_dir)).vocab_embeddings
    kwargs = dict(n_samples=600, scale=0.02, n_simulations=500, seed=5)
    first = null_model(vocab, 15, 14, **kwargs)
    assert first == null_model(vocab, 15, 14, **kwargs)
    assert isinstance(first, NullModelResult)
    assert (first.n_vectors, first.observed_n_unique, first.n_simulations) == (15, 14, 500)
    assert first.n_samples == 600 and first.expected_n_unique_se >= 0  # 600 < FIRST_SAMPLES: one look
    assert 1 <= first.expected_n_unique <= 15 and 0 < first.p_value <= 1 and first.p_value_se >= 0
    assert not np.array_equal(null_token_ids(vocab, 0, 600, 0.02, seed=5), null_token_ids(vocab, 0, 600, 0.02, seed=6))


POOL = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])  # a small pool of decoded ids: 10 directions, 6 tokens


def test_subset_expectation_is_the_mean_over_every_subset():
    for n in (1, 3, 5, 10):
        by_hand = np.mean([len(set(POOL[list(c)])) for c in itertools.combinations(range(10), n)])
        assert subset_expected_n_unique(np.bincount(POOL), n) == pytest.approx(by_hand, rel=1e-12)


def test_simulated_subsets_are_uniform_over_the_subsets():
    exact = np.bincount([len(set(POOL[list(c)])) for c in itertools.combinations(range(10), 4)], minlength=5)
    exact = exact / exact.sum()
    counts = subset_n_unique(POOL, 4, 40_000, np.random.default_rng(0))
    observed = np.bincount(counts, minlength=5) / 40_000
    np.testing.assert_allclose(observed, exact, atol=4 * np.sqrt(0.25 / 40_000))


def test_pool_estimates_are_unbiased_and_their_errors_honest():
    """Pools drawn from a known distribution (uniform over 2,000 tokens): E[n_unique] and P(n_unique <= 48) for
    50 vectors, against the exact expectation and an independent simulation. The plug-in estimate (draws with
    replacement from the pool's frequencies) is biased low by about n^2 / 2N = 1.25 tokens at N = 1,000."""
    p = np.full(2000, 1 / 2000)
    truth = expected_n_unique(p, 50)
    rng = np.random.default_rng(7)
    direct = [np.unique(rng.choice(2000, size=50)).size for _ in range(40_000)]
    p48 = np.mean(np.array(direct) <= 48)
    pools = [pool_estimates(rng.integers(0, 2000, size=1000), 50, n_simulations=2000, seed=i) for i in range(30)]
    expected = np.array([e.expected for e in pools])
    assert abs(expected.mean() - truth) < 4 * expected.std(ddof=1) / np.sqrt(30)
    assert np.mean([e.expected_se for e in pools]) >= 0.7 * expected.std(ddof=1)  # an upper bound, about
    plug_in = np.mean([expected_n_unique(np.bincount(rng.integers(0, 2000, size=1000), minlength=2000) / 1000, 50)
                       for _ in range(30)])
    assert truth - plug_in > 1.0
    cdf48 = np.array([e.at_most[48] / e.n_simulations for e in pools])
    assert abs(cdf48.mean() - p48) < 4 * np.sqrt(cdf48.var(ddof=1) / 30 + p48 * (1 - p48) / 40_000)
    assert np.mean([e.cdf_se[48] for e in pools]) >= 0.7 * cdf48.std(ddof=1)


def test_directions_are_added_until_the_errors_are_small_enough(monkeypatch):
    """Planted vocabulary (8 tokens, uniform): precise at the first look. Forced imprecise: up to max_samples, in
    chunk_rows steps. Never fewer than GROUPS x n_vectors."""
    vocab = torch.cat([torch.eye(4), -torch.eye(4)])
    options = dict(scale=0.3, n_simulations=1000, chunk_rows=500, use_cache=False)
    precise = sampled_null(vocab, 5, max_samples=20_000, **options)
    assert precise.n_samples == 2048 and precise.precise_enough()
    assert precise.expected == pytest.approx(8 * (1 - (7 / 8) ** 5), abs=4 * precise.expected_se + 1e-3)
    looks = []
    monkeypatch.setattr(PoolEstimates, "precise_enough", lambda self: looks.append(self.n_samples) or False)
    assert sampled_null(vocab, 5, max_samples=3300, **options).n_samples == 3300
    assert looks == [2048, 2548, 3048, 3300]
    assert sampled_null(vocab, 500, max_samples=10, **options).n_samples == GROUPS * 500


def test_a_slow_first_run_shows_progress(monkeypatch, capsys):
    monkeypatch.setattr(null_model_module, "PROGRESS_DELAY", 0)
    sampled_null(torch.eye(4), 3, max_samples=100, use_cache=False)
    assert "null model: random directions decoded" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: expected_n_unique([0.5, 0.6], 5), "sums to"),
        (lambda: expected_n_unique([1.5, -0.5], 5), "negative"),
        (lambda: expected_n_unique([], 5), "shape"),
        (lambda: expected_n_unique([1.0], 0), "n_vectors 0"),
        (lambda: expected_n_unique([1.0], 2.5), "n_vectors 2.5"),
        (lambda: unique_count_p_value([0.5, 0.5], 50, observed=51), "observed n_unique 51"),
        (lambda: unique_count_p_value([0.5, 0.5], 50, observed=0), "observed n_unique 0"),
        (lambda: unique_count_p_value([0.5, 0.5], 50, observed=True), "observed n_unique True"),
        (lambda: unique_count_p_value([0.5, 0.5], 50, observed=1, n_simulations=0), "n_simulations 0"),
        (lambda: null_token_distribution(torch.eye(3), 0), "n_samples 0"),
        (lambda: null_token_distribution(torch.eye(3), 10, scale=-1.0), "scale -1.0"),
        (lambda: null_token_distribution(torch.eye(3), 10, scale=float("nan")), "scale nan"),
        (lambda: null_token_distribution(torch.ones(3), 10), "vocab has shape"),
        (lambda: null_model(torch.eye(3), 5, 2, n_samples=10, n_simulations=-1), "n_simulations -1"),
        (lambda: null_model(torch.eye(3), 5, 6, n_samples=10), "observed n_unique 6"),
        (lambda: sampled_null(torch.eye(3), 200_000), "turn it off with results.null_samples 0"),
        (lambda: pool_estimates(np.zeros(30, dtype=int), 5), "too small for 5 vectors"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(call, bad):
    with pytest.raises(UserError, match=bad) as info:
        call()
    assert "\n" not in str(info.value)
