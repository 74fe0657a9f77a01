"""Each prior keeps the promise it makes; the objective's aggregations; prior specs and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from amax_lightning.base.errors import UserError
from amax_lightning.optimize.objective import aggregate
from amax_lightning.optimize.priors import Fluency, NormClamp, StraightThrough, VocabDistance, norm_range, parse_priors


def test_clamp_keeps_every_norm_inside_the_vocabulary_range(fit_tiny):
    free, _ = fit_tiny("free", lr=0.3)
    low, high = norm_range(free.backbone)
    assert free.parameter.detach().norm(dim=-1).max() > high * 1.05  # without the clamp the norm does leave
    clamped, results = fit_tiny("clamp", priors="clamp", lr=0.3)
    norms = clamped.parameter.detach().norm(dim=-1)
    assert norms.min() >= low * (1 - 1e-5) and norms.max() <= high * (1 + 1e-5)
    assert results["priors"] == ["clamp"]


def test_straight_through_optimizes_real_tokens_exactly(fit_tiny):
    module, results = fit_tiny(priors="straight_through", lr=0.05)
    embedding = module.objective.embeddings(module.parameter)
    fed = module.objective.model_input(embedding)
    vocab = module.backbone.vocab_embeddings
    for run, rows in zip(results["runs"], fed):
        assert torch.equal(rows, vocab[torch.tensor(run["token_ids"])])  # the model saw exactly these tokens
        assert run["position_activations"] == run["decoded_position_activations"]
        assert run["decoded_gap"] == 0.0


def test_vocab_distance_penalty_is_the_distance_to_the_nearest_row(tiny_backbone):
    vocab = tiny_backbone.vocab_embeddings.detach()
    planted = vocab[torch.tensor([[10, 20, 30]])].clone()
    prior = VocabDistance(2.0)
    assert prior.penalty(planted, planted, tiny_backbone).abs().max() < 1e-3  # a token row is at distance 0
    moved = planted + torch.tensor([0.3] + [0.0] * 63)
    expected = 2.0 * torch.cdist(moved[0], vocab).min(dim=-1).values.sum()
    torch.testing.assert_close(prior.penalty(moved, moved, tiny_backbone)[0], expected)


def test_vocab_distance_pulls_vectors_toward_tokens(fit_tiny):
    _, free = fit_tiny("free", lr=0.05, steps=40)
    _, pulled = fit_tiny("pulled", priors="vocab_distance=1.0", lr=0.05, steps=40)
    assert pulled["reproducibility"]["mean_nearest_cosine"] > free["reproducibility"]["mean_nearest_cosine"] + 0.05


def test_softmax_parameterization_mixes_vocabulary_rows(fit_tiny):
    module, results = fit_tiny(priors="softmax=0.5", lr=0.1)
    vocab = module.backbone.vocab_embeddings.detach()
    assert module.parameter.shape == (3, 5, vocab.shape[0])
    expected = torch.softmax(module.parameter.detach() / 0.5, dim=-1) @ vocab
    torch.testing.assert_close(module.objective.embeddings(module.parameter).detach(), expected)
    assert results["priors"] == ["softmax=0.5"] and results["uniqueness"]["n_total"] == 15


def test_fluency_penalty_is_the_models_own_cross_entropy(tiny_gpt2_dir, tiny_backbone):
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    embeds = tiny_backbone.embed_tokens(ids).detach()
    penalty = Fluency(0.5).penalty(embeds, embeds, tiny_backbone)
    lm = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
    expected = 0.5 * F.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(penalty[0], expected, rtol=1e-4, atol=1e-4)


def test_fluency_run_completes(fit_tiny):
    _, results = fit_tiny(lr=1e-2, priors="fluency=0.1,straight_through", steps=5)
    assert results["priors"] == ["fluency=0.1", "straight_through"]


@pytest.mark.parametrize("how, expected", [("mean", [8 / 3, -1.0]), ("last", [3.0, -3.0]), ("max", [4.0, 1.0])])
def test_aggregations(how, expected):
    activations = torch.tensor([[1.0, 4.0, 3.0], [1.0, -1.0, -3.0]])
    assert aggregate(activations, how).tolist() == pytest.approx(expected)


def test_parse_priors():
    parsed = parse_priors("clamp, vocab_distance=0.5,straight_through")
    assert [type(p) for p in parsed.priors] == [NormClamp, VocabDistance, StraightThrough]
    assert parse_priors("").priors == [] and parse_priors(None).priors == []
    assert parsed.names == ["clamp", "vocab_distance=0.5", "straight_through"]


@pytest.mark.parametrize(
    "spec, message",
    [("nope", "unknown"), ("clamp=1", "takes no value"), ("vocab_distance", "needs a number"),
     ("vocab_distance=-1", "out of range"), ("softmax=0", "out of range"), ("fluency=nan", "out of range"),
     ("clamp,clamp", "repeat"), ("softmax=1,clamp", "cannot be combined"), ("l2=0.1", "--model.l2")],
)
def test_bad_priors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_priors(spec)
