"""The row objective, usable without Lightning: parameter rows -> input embeddings -> activations -> loss per row.

A run optimizes rows = units x seeds (``RowLayout``): row ``r`` maximizes unit ``r // n_seeds`` starting from
seed ``seeds[r % n_seeds]``. The loss is a sum of per-row terms (minus the row's objective plus its priors'
penalties) and each row starts from its own generator, so every row follows exactly the trajectory it would
follow alone; that is what makes batching, chunking and sharding rows across processes honest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from amax_lightning.base.checks import check_run_size
from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.decode import CheckedNearestTokens, nearest_tokens_with_neighbours
from amax_lightning.model.readout import Readout, build_readout
from amax_lightning.model.targets import Target
from amax_lightning.optimize.param import TokenEmbedding, perturb
from amax_lightning.optimize.priors import Prior

AGGREGATIONS = ("mean", "last", "max")
TOP_K = 5  # nearest tokens listed per optimized vector in results.json


def aggregate(activations: torch.Tensor, how: str) -> torch.Tensor:
    """Each row's objective, shape (rows,), from its activations (rows, n_tokens): ``mean``, ``last`` or ``max``."""
    if how == "mean":
        return activations.mean(dim=-1)
    if how == "last":
        return activations[:, -1]
    if how == "max":
        return activations.max(dim=-1).values
    raise ValueError(f"aggregation {how!r} is unknown; allowed: {', '.join(AGGREGATIONS)}")


def shard_bounds(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of process ``rank``'s contiguous shard of ``n_rows`` rows.

    Shards differ in size by at most one, earlier ranks take the larger ones, and concatenating the shards
    in rank order gives the rows in their original order.
    """
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Which unit and seed each row optimizes, and which rows process ``rank`` of ``world_size`` runs.

    Rows are units x seeds x copies, copies innermost: ``copies`` > 1 runs every seed several times from
    perturbed starts (the sensitivity study, ``analysis/sensitivity.py``); copy c of a seed is ``row % copies``.
    """

    n_units: int
    seeds: tuple[int, ...]
    world_size: int = 1
    rank: int = 0
    copies: int = 1

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def rows_per_unit(self) -> int:
        return self.n_seeds * self.copies

    @property
    def n_rows(self) -> int:
        return self.n_units * self.rows_per_unit

    def unit_of(self, row: int) -> int:
        """Index (into the run's targets) of the unit row ``row`` maximizes."""
        return row // self.rows_per_unit

    def seed_of(self, row: int) -> int:
        """The seed row ``row`` starts from."""
        return self.seeds[(row // self.copies) % self.n_seeds]

    def copy_of(self, row: int) -> int:
        """Which of its seed's copies row ``row`` is (0 without copies)."""
        return row % self.copies

    def unit_rows(self, unit: int) -> slice:
        """The rows of unit ``unit``: per seed in the run's seed order, its copies."""
        return slice(unit * self.rows_per_unit, (unit + 1) * self.rows_per_unit)

    def shard_of(self, rank: int) -> slice:
        """Process ``rank``'s contiguous rows."""
        return slice(*shard_bounds(self.n_rows, self.world_size, rank))

    @property
    def shard(self) -> slice:
        """This process's contiguous rows."""
        return self.shard_of(self.rank)

    def for_process(self, world_size: int, rank: int) -> RowLayout:
        """The same rows, sharded over ``world_size`` processes, seen from process ``rank``."""
        return dataclasses.replace(self, world_size=world_size, rank=rank)

    def gather(self, local: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Every process's per-row tensor (shard rows, ...) concatenated into (rows, ...) in row order.

        ``all_gather`` stacks equal-shaped tensors from all processes (``LightningModule.all_gather``); shards are
        padded to the largest one for it.
        """
        if self.world_size == 1:
            return local
        size = math.ceil(self.n_rows / self.world_size)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: local.shape[0]] = local
        stacked = all_gather(padded)  # (world, size, ...)
        shards = [self.shard_of(rank) for rank in range(self.world_size)]
        return torch.cat([stacked[rank, : s.stop - s.start] for rank, s in enumerate(shards)])


class RowValues(NamedTuple):
    """What the objective computes for a slice of rows."""

    embedding: torch.Tensor  # (rows, n_tokens, d_model): the input embeddings the parameter stands for
    activations: torch.Tensor  # (rows, n_tokens): each row's own unit at every position
    loss: torch.Tensor  # (rows,): minus the aggregated activation, plus the priors' penalties


@dataclasses.dataclass(frozen=True)
class RowTensors:
    """End-of-fit tensors of rows (in row order), on any device."""

    token_ids: torch.Tensor  # (rows, n_tokens) nearest token of each optimized vector (cosine)
    cosine: torch.Tensor  # (rows, n_tokens) that token's cosine with the vector
    position_activations: torch.Tensor  # (rows, n_tokens) the unit at the optimized model input
    decoded_position_activations: torch.Tensor  # (rows, n_tokens) the unit at the decoded token ids
    embedding: torch.Tensor  # (rows, n_tokens, d_model) the optimized input embeddings
    top_ids: torch.Tensor | None  # (rows, n_tokens, 5) the 5 nearest tokens of each optimized vector, best first
    top_cosine: torch.Tensor | None  # (rows, n_tokens, 5) their cosines (both None when not asked for)

    def __iter__(self):
        return (getattr(self, f.name) for f in dataclasses.fields(self))

    def rows(self, selected: slice) -> RowTensors:
        """The same tensors for the rows ``selected``."""
        return RowTensors(*(None if tensor is None else tensor[selected] for tensor in self))


class RowObjective(nn.Module):
    """The loss of every row: parameterization -> priors' model input -> frozen backbone -> unit -> aggregate.

    Parameters
    ----------
    backbone
        The frozen model; all targets must be units of one hook of it.
    targets
        The units, in row order (``layout.unit_of``).
    layout
        Rows = units x seeds.
    readout
        Each row's unit from the hook's values (``readout.build_readout``): a coordinate, SAE latent or direction.
    aggregate
        How a row's activations over positions become its objective (``AGGREGATIONS``).
    parameterization
        What a parameter row is (``optimize/param.py``): the embedding itself, or logits over the vocabulary.
    priors
        Penalties, model-input changes and projections (``optimize/priors.py``), applied in order.
    """

    def __init__(self, backbone: Backbone, targets: list[Target], layout: RowLayout, readout: Readout,
                 aggregate: str = "mean", parameterization: TokenEmbedding | None = None,
                 priors: list[Prior] = (), perturbations: list[tuple[int, float, int]] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.targets = list(targets)
        self.layout = layout
        self.aggregation = aggregate
        self.parameterization = parameterization or TokenEmbedding()
        self.priors = list(priors)
        self.readout = readout
        self.perturbations = perturbations  # per copy: (size index, relative size, replica); None = no copies

    def initial_parameter(self, n_tokens: int) -> torch.Tensor:
        """Every row's start point, shape (rows, n_tokens, width): each seed's draw, repeated for every unit; with
        ``perturbations``, each copy of a seed is its draw perturbed (``param.perturb``)."""
        per_seed = self.parameterization.initial(list(self.layout.seeds), n_tokens, self.backbone)
        if self.perturbations:
            per_seed = torch.stack([perturb(start, seed, *copy) for seed, start in zip(self.layout.seeds, per_seed)
                                    for copy in self.perturbations])
        return per_seed.repeat(self.layout.n_units, 1, 1)

    def embeddings(self, parameter_rows: torch.Tensor) -> torch.Tensor:
        """The input embeddings (rows, n_tokens, d_model) that parameter rows stand for."""
        return self.parameterization.embedding(parameter_rows, self.backbone)

    def model_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """What the model is fed for ``embedding``: the embedding, or what a prior makes of it (straight-through)."""
        for prior in self.priors:
            embedding = prior.model_input(embedding, self.backbone)
        return embedding

    def position_activations(self, model_input: torch.Tensor, rows: slice) -> torch.Tensor:
        """Each row's own unit at every position, shape (rows, n_tokens), for model inputs (rows, n_tokens, d)."""
        return self.readout(self.backbone.hook_values(model_input, self.targets[0]), rows)

    def unit_reader(self, unit: int):
        """``read(inputs_embeds) -> (batch, n_tokens)``: the run's unit ``unit`` for any model input."""
        return lambda inputs: self.readout.read_unit(self.backbone.hook_values(inputs, self.targets[0]), unit)

    def objective(self, activations: torch.Tensor) -> torch.Tensor:
        """Each row's objective, shape (rows,): its activations (rows, n_tokens) reduced by the aggregation."""
        return aggregate(activations, self.aggregation)

    def forward(self, parameter_rows: torch.Tensor, rows: slice) -> RowValues:
        """Embedding, activations and loss of the parameter rows ``parameter_rows`` = rows ``rows`` of the run."""
        embedding = self.embeddings(parameter_rows)
        model_input = self.model_input(embedding)
        activations = self.position_activations(model_input, rows)
        loss = -self.objective(activations)
        for prior in self.priors:
            penalty = prior.penalty(embedding, model_input, self.backbone)
            if penalty is not None:
                loss = loss + penalty
        return RowValues(embedding, activations, loss)

    @torch.no_grad()
    def evaluate(self, parameter: torch.Tensor, chunks: list[slice], token_ids: torch.Tensor | None = None,
                 decoder: CheckedNearestTokens | None = None) -> RowTensors:
        """End-of-fit tensors of the rows in ``chunks`` (consecutive): each optimized embedding, its nearest token
        and ``TOP_K`` nearest tokens (cosine), and the unit's activations at the optimized model input and at the
        decoded token ids. ``token_ids`` (rows, n_tokens), when the rows are real tokens (token search), are the
        decoded tokens themselves. With ``decoder`` (a sweep's analysis) the nearest tokens come from that checked
        fast path (the same ids), their cosines from the pairs alone, and no neighbours are listed."""
        embedding = torch.cat([self.embeddings(parameter[rows]) for rows in chunks])
        vocab = self.backbone.vocab_embeddings
        if decoder is None:
            nearest, cosine, top_ids, top_cosine = nearest_tokens_with_neighbours(embedding, vocab, k=TOP_K)
        elif token_ids is None:
            nearest = decoder(embedding.reshape(-1, embedding.shape[-1])).reshape(embedding.shape[:-1])
            cosine = torch.nn.functional.cosine_similarity(embedding.float(), vocab[nearest].float(), dim=-1)
            top_ids = top_cosine = None
        else:  # token search's rows are their tokens: nothing to decode (their cosines below)
            nearest, cosine, top_ids, top_cosine = token_ids, None, None, None
        if token_ids is None:
            token_ids = nearest
        else:
            cosine = torch.nn.functional.cosine_similarity(embedding, self.backbone.embed_tokens(token_ids), dim=-1)
        start = chunks[0].start

        def activations(model_input: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.position_activations(model_input[rows.start - start : rows.stop - start], rows)
                              for rows in chunks])

        optimized = activations(self.model_input(embedding))
        decoded = activations(self.backbone.embed_tokens(token_ids))
        return RowTensors(token_ids, cosine, optimized, decoded, embedding, top_ids, top_cosine)

    @torch.no_grad()
    def project_(self, parameter: torch.Tensor) -> None:
        """Apply every prior's projection (e.g. the norm clamp) to the parameter, in place."""
        for prior in self.priors:
            prior.project_(parameter, self.backbone)


def build_objective(backbone: Backbone, target: str, seeds: list[int], n_tokens: int, aggregate: str,
                    parameterization: TokenEmbedding, priors: list[Prior], sae_activation: str = "pre",
                    center_residual: str = "auto", perturbations: list[tuple[int, float, int]] | None = None
                    ) -> tuple[RowObjective, list]:
    """A run's row objective, its inputs checked against the model (one-line UserErrors), and per unit the record
    of what it reads (the SAE latent or direction, for results.json; None for a plain unit).

    ``target`` is the target string (``model/targets.py``, ``model/readout.py``); ``perturbations`` the copies of every seed
    (``param.perturbation_copies``), None for one unperturbed copy.
    """
    if backbone.max_positions is not None and n_tokens > backbone.max_positions:
        raise UserError(f"n_tokens {n_tokens} is out of range; this model's context allows 1..{backbone.max_positions}")
    copies = len(perturbations) if perturbations else 1
    built = build_readout(target, backbone, len(seeds) * copies, sae_activation, center_residual)
    targets = built.targets
    if not backbone.supports(targets[0]):
        raise UserError(f"target hook {targets[0].hook!r} needs a GPT-2 model; this model offers hook_resid_pre")
    if any(p.needs_gpt2 for p in priors) and not backbone.is_gpt2:
        raise UserError("prior 'fluency' needs a GPT-2 model (its LM head is the input embedding)")
    layout = RowLayout(len(targets), tuple(seeds), copies=copies)
    check_run_size(layout.n_rows, n_tokens, parameterization.width(backbone))
    objective = RowObjective(backbone, targets, layout, built.readout, aggregate, parameterization, priors,
                             perturbations)
    return objective, built.records
