"""Priors on the optimized embedding: penalties and projections, small composable pieces, each off by default.

A prior can add a per-row penalty to the loss, change what the model sees (``model_input``), or project the
parameter inside each optimizer step (``project_``). What is learned (the embedding, or logits over the
vocabulary) is a parameterization (``optimize/param.py``); ``softmax=T`` is spelled among the priors on the command line
and parsed here into one.

On the command line they are one string, ``--model.priors "clamp,vocab_distance=0.1,straight_through"``;
the L2 penalty of the original protocol is ``--model.l2``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.decode import nearest_tokens
from amax_lightning.optimize.param import TokenEmbedding, VocabSoftmax


class Prior:
    """Base class: no penalty, the model sees the embedding as is, no projection."""

    name = "prior"
    needs_gpt2 = False  # True if the prior uses GPT-2's tied LM head

    def penalty(self, embedding: torch.Tensor, model_input: torch.Tensor, backbone: Backbone) -> torch.Tensor | None:
        """Per-seed penalty, shape (seeds,), added to the loss; None for none."""
        return None

    def model_input(self, embedding: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        """What the model is fed for ``embedding`` (seeds, tokens, d_model)."""
        return embedding

    @torch.no_grad()
    def project_(self, embedding: torch.Tensor, backbone: Backbone) -> None:
        """Change the parameter in place after an optimizer step."""

    def describe(self) -> str:
        return self.name


class L2(Prior):
    """``weight * ||embedding[seed]||^2``, summed over tokens and dims (the original protocol's lambda)."""

    name = "l2"

    def __init__(self, weight: float):
        self.weight = weight

    def penalty(self, embedding, model_input, backbone):
        return self.weight * embedding.pow(2).sum(dim=(-2, -1))

    def describe(self) -> str:
        return f"l2={self.weight:g}"


class NormClamp(Prior):
    """After every step, rescale each vector whose L2 norm leaves the vocabulary's [min, max] row norm into it."""

    name = "clamp"

    @torch.no_grad()
    def project_(self, embedding, backbone):
        low, high = norm_range(backbone)
        norms = embedding.norm(dim=-1, keepdim=True)
        embedding.mul_(norms.clamp(low, high) / norms.clamp_min(1e-12))


class VocabDistance(Prior):
    """``weight * sum_t min_v ||embedding[seed, t] - vocab[v]||``: pulls each vector toward its nearest token."""

    name = "vocab_distance"

    def __init__(self, weight: float):
        self.weight = weight

    def penalty(self, embedding, model_input, backbone):
        vocab = backbone.vocab_embeddings
        flat = embedding.reshape(-1, embedding.shape[-1])
        nearest = torch.cat([torch.cdist(chunk, vocab).min(dim=-1).values for chunk in flat.split(1024)])
        return self.weight * nearest.view(embedding.shape[:-1]).sum(dim=-1)

    def describe(self) -> str:
        return f"vocab_distance={self.weight:g}"


class StraightThrough(Prior):
    """The model sees the nearest token embeddings (cosine); gradients update the continuous vectors."""

    name = "straight_through"

    def model_input(self, embedding, backbone):
        ids, _ = nearest_tokens(embedding.detach(), backbone.vocab_embeddings)
        return backbone.vocab_embeddings[ids] + (embedding - embedding.detach())  # exact rows, identity gradient


class Fluency(Prior):
    """``weight *`` the model's own next-token cross-entropy (nats) of the sequence, targets = nearest tokens.

    Needs a GPT-2 model (its LM head is the tied input embedding). One-token inputs have no next token: 0.
    """

    name = "fluency"
    needs_gpt2 = True

    def __init__(self, weight: float):
        self.weight = weight

    def penalty(self, embedding, model_input, backbone):
        if model_input.shape[-2] < 2:
            return torch.zeros(model_input.shape[0], device=model_input.device)
        logits = backbone.lm_logits(model_input[:, :-1])
        targets, _ = nearest_tokens(model_input[:, 1:].detach(), backbone.vocab_embeddings)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return self.weight * ce.mean(dim=-1)

    def describe(self) -> str:
        return f"fluency={self.weight:g}"


@torch.no_grad()
def norm_range(backbone: Backbone) -> tuple[float, float]:
    """Smallest and largest L2 norm of the vocabulary's embedding rows."""
    norms = backbone.vocab_embeddings.norm(dim=-1)
    return float(norms.min()), float(norms.max())


_WEIGHTED = {"vocab_distance": VocabDistance, "fluency": Fluency, "softmax": VocabSoftmax}
_PLAIN = {"clamp": NormClamp, "straight_through": StraightThrough}
PRIOR_NAMES = (*_PLAIN, *_WEIGHTED)


class ParsedPriors(NamedTuple):
    """A ``--model.priors`` string, parsed: what is learned, the priors, and each item's name in the given order."""

    parameterization: TokenEmbedding
    priors: list[Prior]
    names: list[str]


def parse_priors(spec: str | None) -> ParsedPriors:
    """Parse ``"clamp,vocab_distance=0.1,straight_through,softmax=0.5,fluency=0.05"``.

    ``vocab_distance`` and ``fluency`` take a weight >= 0, ``softmax`` a temperature > 0 (it selects the
    ``VocabSoftmax`` parameterization; without it the embedding is learned); ``clamp`` and
    ``straight_through`` take no value. Each may appear once. Empty or None gives no priors.

    Raises
    ------
    UserError
        On an unknown name, a missing or bad value, a repeat, or a combination that cannot work.
    """
    items: list = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name == "l2":
            raise UserError("prior 'l2' is set with --model.l2, not in --model.priors")
        if name in _PLAIN:
            if value:
                raise UserError(f"prior {name!r} takes no value; write it as {name}")
            items.append(_PLAIN[name]())
        elif name in _WEIGHTED:
            items.append(_WEIGHTED[name](_prior_value(name, value)))
        else:
            raise UserError(f"prior {name!r} is unknown; allowed: {', '.join(PRIOR_NAMES)}")
    names = [p.name for p in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"priors {spec!r} repeat {repeated}; each prior may appear once")
    if "softmax" in names and "clamp" in names:
        raise UserError("priors 'softmax' and 'clamp' cannot be combined: softmax mixtures are not a free parameter")
    parameterization = next((p for p in items if isinstance(p, VocabSoftmax)), TokenEmbedding())
    priors = [p for p in items if isinstance(p, Prior)]
    return ParsedPriors(parameterization, priors, [p.describe() for p in items])


MAX_PRIOR_VALUE = 1e6  # a weight or temperature beyond it only overflows the loss


def _prior_value(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"prior {name}={text!r} needs a number, e.g. {name}=0.1") from None
    positive = name == "softmax"
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > MAX_PRIOR_VALUE:
        low = "(0" if positive else "[0"
        raise UserError(f"prior {name}={text} is out of range; allowed: {low}, {MAX_PRIOR_VALUE:g}]")
    return value
