"""The null model on planted distributions with known answers, reproducibility, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amax_lightning.backbone import load_backbone
from amax_lightning.errors import UserError
from amax_lightning.null_model import (
    NullModelResult,
    expected_n_unique,
    null_model,
    null_token_distribution,
    simulate_n_unique,
    unique_count_p_value,
)


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
    kwargs = dict(n_samples=3000, scale=0.02, n_simulations=500, seed=5)
    first = null_model(vocab, 50, 48, **kwargs)
    assert first == null_model(vocab, 50, 48, **kwargs)
    assert isinstance(first, NullModelResult)
    assert (first.n_vectors, first.n_samples, first.observed_n_unique, first.n_simulations) == (50, 3000, 48, 500)
    assert 1 <= first.expected_n_unique <= 50 and 0 < first.p_value <= 1 and first.p_value_se >= 0
    other = null_model(vocab, 50, 48, **{**kwargs, "seed": 6})
    assert other.expected_n_unique != first.expected_n_unique
    only_expectation = null_model(vocab, 50, **kwargs)
    assert only_expectation.p_value is None and only_expectation.expected_n_unique == first.expected_n_unique


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
    ],
)
def test_bad_inputs_are_one_line_user_errors(call, bad):
    with pytest.raises(UserError, match=bad) as info:
        call()
    assert "\n" not in str(info.value)
