"""The sensitivity study's pieces without a Trainer: perturbations, metrics, the growth-rate fit, the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amax_lightning.analysis.sensitivity import (
    growth_rate,
    relative_distances,
    token_agreement,
    verdict,
)
from amax_lightning.base.errors import UserError
from amax_lightning.commands.sensitivity import load_sensitivity
from amax_lightning.optimize.param import perturb


def test_perturbations_have_the_stated_relative_size_and_their_own_generators():
    start = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3  # fp64: 1e-7 is
    # below fp32's resolution (eps 1.2e-7), where the realized size is rounding-level (the distance curve shows it)
    assert torch.equal(perturb(start, seed=0, size_index=0, size=0.0, replica=2), start)
    for size in (1e-7, 1e-3, 0.1):
        delta = perturb(start, 0, 1, size, 0) - start
        torch.testing.assert_close(delta.norm(dim=-1) / start.norm(dim=-1), torch.full((5,), size, dtype=torch.float64), rtol=1e-9, atol=0)
    a, b, c = (perturb(start, *args) for args in ((0, 1, 0.1, 0), (0, 1, 0.1, 1), (1, 1, 0.1, 0)))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, perturb(start, 0, 1, 0.1, 0))


def test_pair_metrics_on_planted_groups():
    tokens = torch.tensor([[[1, 2, 3], [1, 2, 4]], [[5, 5, 5], [5, 5, 5]]])  # 2 seeds x 2 replicas x 3 positions
    assert token_agreement(tokens) == pytest.approx((2 / 3 + 1) / 2)
    assert token_agreement(tokens[:, :1]) is None
    x = torch.tensor([[[3.0, 4.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(relative_distances(x[:, :, None]).flatten(), torch.tensor([0.0, math.sqrt(2)],
                                                                                       dtype=torch.float64))


def test_growth_rate_recovers_a_known_exponent_and_its_range():
    rng = np.random.default_rng(0)
    steps = list(range(0, 400, 5))
    rate = 0.05
    curve = np.minimum(1e-7 * np.exp(rate * np.asarray(steps)), 0.3) * np.exp(rng.normal(0, 0.05, len(steps)))
    fit = growth_rate(steps, list(curve))
    assert fit["rate"] == pytest.approx(rate, rel=0.05)
    saturated = math.log(0.3 / 10 / 1e-7) / rate  # where the curve comes within 10x of its maximum
    assert fit["first_step"] == 0 and abs(fit["last_step"] - saturated) <= 10
    assert growth_rate(steps, [0.01] * len(steps))["rate"] is None  # no growth: no exponential phase
    assert growth_rate(steps, [0.0] * len(steps))["reason"].startswith("distance is 0")


def sizes(*agreements):
    return [{"size": s, "replica_token_agreement": a} for s, a in zip((0.0, 1e-7, 1e-5, 1e-3, 1e-1), agreements)]


@pytest.mark.parametrize("per_size, seeds, labels", [
    (sizes(1, 0.6, 0.5, 0.4, 0.2), {"token_agreement": 0.1, "embedding_cosine": 0.2}, ["chaotic"]),
    (sizes(1, 0.95, 0.95, 0.9, 0.3), {"token_agreement": 0.28, "embedding_cosine": 0.8}, ["plateau"]),
    (sizes(1, 1, 1, 1, 1), {"token_agreement": 0.8, "embedding_cosine": 0.9, "changed_since_previous": 0.3},
     ["reproducible", "not converged"]),
    (sizes(1, 1, 1, 0.95, 0.5), {"token_agreement": 0.1, "embedding_cosine": 0.1}, ["basins"]),
    (sizes(1, 1, 1, 1, 1), {"token_agreement": 0.8, "embedding_cosine": 0.9}, ["reproducible"]),
    (sizes(1, 1, 1, 0.5, 0.2), {"token_agreement": 0.2, "embedding_cosine": 0.1}, ["undetermined"]),
    (sizes(1, 0.5, 0.5, 0.5, 0.5), {"token_agreement": 0.28, "embedding_cosine": 0.8}, ["chaotic", "plateau"]),
])
def test_verdict_rules(per_size, seeds, labels):
    result = verdict({"sizes": per_size, "seeds": seeds})
    assert result["labels"] == labels and result["text"]


@pytest.mark.parametrize("text, message", [
    ("targets: []\n", "targets must be a non-empty list"),
    ("targets: [a]\nsizes: [-1]\n", "sizes must be a list of numbers in [0, 10]"),
    ("targets: [a]\nreplicas: 1\n", "replicas 1 must be an integer >= 2"),
    ("targets: [a]\nsnapshots: [0]\n", "snapshots must be a list of steps >= 1"),
    ("targets: [a]\nnumerics: [fp8]\n", "numerics 'fp8'"),
    ("targets: [a]\nnope: 1\n", "unknown keys ['nope']"),
    ("targets: [a]\nseeds: 1,1\n", "repeat"),
    ("targets: [a]\nalone: no way\n", "alone must be true or false"),
    ("targets: [a]\nfit_config: 5\n", "fit_config must be a path"),
])
def test_bad_sensitivity_configs(tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sensitivity(str(tmp_path / "s.yaml"))
