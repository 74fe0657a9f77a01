"""Parameterizations: what is learned per row, and the input embedding it stands for (lucent's ``param``).

``TokenEmbedding`` learns the input embedding itself (the study's protocol); ``VocabSoftmax`` learns logits over
the vocabulary per position, whose temperature softmax mixes the vocabulary's embedding rows. Both start from
``randn`` drawn with the row's seed on its own CPU generator, so a seed starts at the same point on every
device and in every batch.
"""

from __future__ import annotations

import numpy as np
import torch

from amax_lightning.base.checks import check_int, check_number
from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import Backbone


def seeded_randn(seed: int, *shape: int) -> torch.Tensor:
    """``randn(*shape)`` from a CPU generator seeded ``seed``: the same numbers on every device and in every batch."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator for the stream named by ``keys`` (e.g. seed and step): independent streams for different
    keys, via numpy's SeedSequence. Users: token-search swaps (seed, step), EPO restarts (seed, step, 1) and
    perturbations (seed, size index, replica); no run uses two of them, so their keys may coincide."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


MAX_PERTURB_SIZE = 10.0  # relative to each vector's norm
MAX_REPLICAS = 1000


def perturbation_copies(sizes: list[float] | None, replicas: int) -> list[tuple[int, float, int]] | None:
    """Each copy of a seed as (size index, relative size, replica), or None without ``sizes`` (one unperturbed copy).

    ``sizes`` and ``replicas`` are the module's ``perturb_sizes`` and ``replicas``; a UserError names a bad one.
    """
    replicas = check_int("replicas", replicas, low=1, high=MAX_REPLICAS)
    if sizes is not None and replicas < 2:
        raise UserError(f"replicas {replicas} with perturb_sizes: give at least 2, so replicas can be compared")
    if sizes is None:
        if replicas != 1:
            raise UserError(f"replicas {replicas} needs perturb_sizes, e.g. --model.perturb_sizes [0,1e-7,1e-3]")
        return None
    if not sizes:
        raise UserError("perturb_sizes is empty; give relative sizes, e.g. [0, 1e-7, 1e-5, 1e-3, 1e-1]")
    sizes = [check_number("perturb_sizes", float(size), low_open=False, high=MAX_PERTURB_SIZE) for size in sizes]
    return [(index, size, replica) for index, size in enumerate(sizes) for replica in range(replicas)]


def perturb(start: torch.Tensor, seed: int, size_index: int, size: float, replica: int) -> torch.Tensor:
    """``start`` (n_tokens, width) plus, per vector, a uniformly random direction of length ``size`` x its norm, drawn
    from the stream (seed, size_index, replica); size 0 returns ``start`` unchanged (the sensitivity study)."""
    if size == 0:
        return start.clone()
    direction = torch.randn(start.shape, generator=keyed_generator(seed, size_index, replica), dtype=start.dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return start + size * start.norm(dim=-1, keepdim=True) * direction


class TokenEmbedding:
    """Learn the input embedding (rows, n_tokens, d_model) directly; it starts as ``randn * std(W_E)``."""

    name = "embedding"

    def width(self, backbone: Backbone) -> int:
        """Last dimension of the learned parameter."""
        return backbone.d_model

    def initial(self, seeds: list[int], n_tokens: int, backbone: Backbone) -> torch.Tensor:
        """The study's start points, shape (seeds, n_tokens, d_model): ``randn`` times ``std(W_E)``."""
        scale = backbone.embedding_std
        return torch.stack([seeded_randn(seed, n_tokens, backbone.d_model) * scale for seed in seeds])

    def embedding(self, parameter: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        """The input embedding a slice of the parameter stands for: itself."""
        return parameter

    def describe(self) -> str | None:
        """How the parameterization is listed under ``priors`` in results.json (None: not listed)."""
        return None


class VocabSoftmax(TokenEmbedding):
    """Learn logits (rows, n_tokens, V), standard normal at the start; the embedding is ``softmax(logits / T) @ W_E``."""

    name = "softmax"

    def __init__(self, temperature: float):
        self.temperature = temperature

    def width(self, backbone: Backbone) -> int:
        return backbone.vocab_embeddings.shape[0]

    def initial(self, seeds: list[int], n_tokens: int, backbone: Backbone) -> torch.Tensor:
        return torch.stack([seeded_randn(seed, n_tokens, self.width(backbone)) for seed in seeds])

    def embedding(self, parameter: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        return torch.softmax(parameter / self.temperature, dim=-1) @ backbone.vocab_embeddings

    def describe(self) -> str | None:
        return f"softmax={self.temperature:g}"
