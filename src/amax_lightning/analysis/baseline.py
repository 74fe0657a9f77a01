"""Data-sampling baseline: which real tokens (and text contexts) drive the target unit highest?

Each function reads ``target`` from the backbone, or, given ``reader(inputs_embeds) -> (batch, n_tokens)``
(``RowObjective.unit_reader``), whatever that reads: an SAE latent or a direction.

Gradient ascent finds *vectors*; this module asks the data directly. :func:`top_tokens` runs every vocabulary
token alone as a one-token input; :func:`overlap` counts how many gradient-ascent tokens are among the top data
tokens. Real text, read from a corpus, is ``corpus_pass.py``'s.

Note: a one-token input sits at position 0, where GPT-2's residual stream has massive activations in a few
dimensions; the per-token ranking is a ranking *at position 0*, which the corpus pass does not share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError
from amax_lightning.base.progress import Progress
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.targets import Target, parse_target


@dataclass(frozen=True)
class TopTokens:
    """The k vocabulary tokens of highest one-token activation, best first (ties: lower id first)."""

    token_ids: list[int]
    tokens: list[str]
    activations: list[float]


@dataclass(frozen=True)
class Overlap:
    """How many gradient-ascent tokens (counted with repeats) are among the top-k data tokens.

    ``count`` of the ``n_gradient`` gradient tokens are in the top set; ``fraction = count / n_gradient``;
    ``shared_ids`` are the distinct shared ids, ascending.
    """

    count: int
    n_gradient: int
    fraction: float
    shared_ids: list[int]



def _target(backbone: Backbone, target: Target | str) -> Target:
    target = target if isinstance(target, Target) else parse_target(target, backbone.shape)
    if not backbone.supports(target):
        raise UserError(f"target {target.spec!r} cannot be read from this model; it supports hook_resid_pre only")
    return target


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, largest first, ties broken by lower index (a stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


@torch.no_grad()
def token_activations(backbone: Backbone, target: Target | str, chunk_size: int = 4096, reader=None) -> torch.Tensor:
    """The target's activation for every vocabulary token fed alone as a one-token input.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer.
    target
        The unit, as a :class:`Target` or a spec such as ``blocks.8.hook_resid_pre:91``.
    chunk_size
        Tokens run per forward pass (count, >= 1); bounds memory, does not change the result.

    Returns
    -------
    torch.Tensor
        Shape (V,) on the CPU, float32: entry i is the activation for token id i (V = ``len(vocab_embeddings)``).
    """
    target = _target(backbone, target)
    read = reader or (lambda inputs: backbone(inputs, target))
    chunk_size = check_int("chunk_size", chunk_size, 1)
    vocab_size = backbone.vocab_embeddings.shape[0]
    device = backbone.vocab_embeddings.device
    out = []
    with Progress("data baseline: one-token inputs", vocab_size, "tokens") as progress:
        for ids in torch.arange(vocab_size, device=device).split(chunk_size):
            out.append(read(backbone.embed_tokens(ids[:, None]))[:, 0].float().cpu())
            progress.advance(len(ids))
    return torch.cat(out)


def top_tokens(backbone: Backbone, target: Target | str, k: int = 20, chunk_size: int = 4096, reader=None) -> TopTokens:
    """The k vocabulary tokens whose one-token activation of ``target`` is highest.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer.
    target
        The unit, as a :class:`Target` or a spec string.
    k
        Tokens to return (count, 1..V).
    chunk_size
        Tokens run per forward pass (count, >= 1).

    Returns
    -------
    TopTokens
    """
    k = check_int("k", k, 1, backbone.vocab_embeddings.shape[0])
    acts = token_activations(backbone, target, chunk_size, reader)
    ids = _top_indices(acts, k).tolist()
    return TopTokens(ids, backbone.token_strings(ids), acts[ids].tolist())


def overlap(gradient_token_ids, top_ids) -> Overlap:
    """How many gradient-ascent tokens are among the top data tokens.

    Parameters
    ----------
    gradient_token_ids
        Decoded ids of the optimized vectors, any shape (e.g. seeds x tokens); repeats count each time.
    top_ids
        Ids of the top-k data tokens (e.g. ``TopTokens.token_ids``); repeats are ignored.

    Returns
    -------
    Overlap
        ``count`` gradient tokens in ``top_ids``, ``n_gradient``, ``fraction = count / n_gradient``, and the
        distinct shared ids.
    """
    grad = [int(i) for i in torch.as_tensor(gradient_token_ids).reshape(-1).tolist()]
    top = {int(i) for i in torch.as_tensor(top_ids).reshape(-1).tolist()}
    if not grad:
        raise UserError("gradient_token_ids is empty; give at least one token id")
    count = sum(i in top for i in grad)
    return Overlap(count, len(grad), count / len(grad), sorted(top.intersection(grad)))
