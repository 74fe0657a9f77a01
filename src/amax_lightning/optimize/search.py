"""Token search: GCG and EPO over real tokens, batched over rows, exact and deterministic; no Lightning here.

GCG (Zou et al. 2023, nanoGCG): per step, the gradient of each row's objective with respect to its one-hot input
(through the input-embedding matrix) ranks, per position, the ``top_k`` tokens of largest first-order gain;
``candidates`` single-token swaps per row are drawn from them; all rows x candidates are scored in one batched
(truncated) forward, and each row keeps its best sequence: the current one unless a swap beats it.

EPO (Thompson et al. 2024, "Fluent dreaming"): per row a population; member i maximizes
``activation - fluency_weights[i] * cross_entropy`` (the model's own mean next-token loss on the sequence, nats).
Children come from the same swaps (child j from member ``j % population``); each member becomes the best of the
pooled members and children under its own weight. Every evaluated (activation, cross_entropy) point feeds each
row's Pareto frontier. Restarts, as dreamy's EPO does them: every ``restart_every`` steps (step 0 included) the
whole population of a row becomes the pool's best under one penalty ``2.0 x m``, ``m`` uniform in [1/3, 3] per row
and step (dreamy draws it the same way, then scores with 2.0 itself; here the drawn penalty is used).

Randomness: the initial tokens come from ``Generator().manual_seed(seed)`` and the swaps of step ``t`` from a
generator seeded by ``(seed, t)`` (restart penalties from ``(seed, t, 1)``): a row follows the same trajectory
alone, in any batch, on any process, and after a resume (the step count restores the generator). Objectives of
kept members are stored, never recomputed, so each member's objective never decreases between restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.chunking import chunked_value_and_grad
from amax_lightning.optimize.objective import RowObjective
from amax_lightning.optimize.param import keyed_generator
from amax_lightning.optimize.pareto import FRONTIER_CAPACITY, pareto_merge

RESTART_PENALTY, RESTART_SPREAD = 2.0, 3.0  # EPO restarts: penalty 2.0 x m, m uniform in [1/3, 3] (dreamy's)
MAX_INITIAL_DRAWS = 1000  # draws of an initial sequence that must survive retokenization
_RETOKENIZE_CACHE_SIZE = 1_000_000
T = TypeVar("T")


def log_spaced_weights(population: int, low: float = 0.1, high: float = 10.0) -> list[float]:
    """``population`` fluency weights log-spaced over ``[low, high]`` (EPO's default population)."""
    if population == 1:
        return [low]
    return [float(low * (high / low) ** (i / (population - 1))) for i in range(population)]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of seed ``seed``'s swaps at step ``step``."""
    return keyed_generator(seed, step)


def restart_penalty(seed: int, step: int) -> float:
    """EPO's cross-entropy penalty for seed ``seed``'s restart at step ``step``: ``RESTART_PENALTY`` times a factor
    uniform in ``[1 / RESTART_SPREAD, RESTART_SPREAD]``, from the stream (seed, step, 1)."""
    low, high = 1.0 / RESTART_SPREAD, RESTART_SPREAD
    u = float(torch.rand((), generator=keyed_generator(seed, step, 1), dtype=torch.float64))
    return RESTART_PENALTY * (low + (high - low) * u)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How rows are searched: ``method`` (``gcg`` or ``epo``), swaps from the gradient's ``top_k`` tokens per
    position, ``candidates`` children per row per step, one fluency weight per population member (GCG: ``(0.0,)``),
    whether candidates must survive decode -> encode (``retokenize``), and EPO's restarts every ``restart_every``
    steps (0: never)."""

    method: str
    top_k: int
    candidates: int
    fluency_weights: tuple[float, ...]
    retokenize: bool
    restart_every: int = 0

    def restarts_at(self, step: int) -> bool:
        """Whether EPO restarts its populations at step ``step``."""
        return self.fluency and self.restart_every > 0 and step % self.restart_every == 0

    @property
    def population(self) -> int:
        return len(self.fluency_weights)

    @property
    def fluency(self) -> bool:
        """Whether the cross-entropy is computed (EPO)."""
        return self.method == "epo"


class SearchState(NamedTuple):
    """Every row's search state (row order of the run); also what a checkpoint holds."""

    tokens: torch.Tensor  # (rows, population, n_tokens) long: each member's sequence
    activation: torch.Tensor  # (rows, population): each member's objective (the aggregated activation)
    cross_entropy: torch.Tensor  # (rows, population): each member's mean next-token loss (0 for GCG)
    frontier_activation: torch.Tensor  # (rows, F): Pareto points, -inf where empty (F = 0 for GCG)
    frontier_cross_entropy: torch.Tensor  # (rows, F): +inf where empty
    frontier_tokens: torch.Tensor  # (rows, F, n_tokens)

    def rows(self, selected: slice) -> SearchState:
        return SearchState(*(tensor[selected] for tensor in self))


class Evaluated(NamedTuple):
    """The children scored in one step, per row: (rows, candidates[, n_tokens]); ``valid`` False = filtered out."""

    tokens: torch.Tensor
    activation: torch.Tensor
    cross_entropy: torch.Tensor
    valid: torch.Tensor


class TokenSearch:
    """GCG / EPO steps over the rows of a ``RowObjective`` (its backbone, readout, layout and aggregation).

    Parameters
    ----------
    objective
        The run's rows; its priors must be empty (they act on continuous embeddings).
    settings
        ``SearchSettings``.
    allowed
        Bool mask (V,) of usable tokens (``allowed_tokens``).
    """

    def __init__(self, objective: RowObjective, settings: SearchSettings, allowed: torch.Tensor) -> None:
        self.objective = objective
        self.settings = settings
        self.allowed = allowed
        self.allowed_ids = allowed.nonzero().flatten()
        self.top_k = min(settings.top_k, len(self.allowed_ids))
        self._retokenizes: dict[tuple[int, ...], bool] = {}

    @property
    def backbone(self) -> Backbone:
        return self.objective.backbone

    # --- start ---------------------------------------------------------------------------------------
    def initial_state(self, n_tokens: int) -> SearchState:
        """Every row's start: each seed's draw (uniform over the allowed tokens, re-drawn until it survives
        retokenization when asked), for every member and unit; objectives NaN until the first step scores them."""
        per_seed = torch.stack([self.initial_tokens(seed, n_tokens) for seed in self.objective.layout.seeds])
        rows, population = self.objective.layout.n_rows, self.settings.population
        tokens = per_seed.repeat(self.objective.layout.n_units, 1)[:, None].expand(-1, population, -1).clone()
        capacity = FRONTIER_CAPACITY if self.settings.fluency else 0
        return SearchState(
            tokens, torch.full((rows, population), math.nan), torch.zeros(rows, population),
            torch.full((rows, capacity), -math.inf), torch.full((rows, capacity), math.inf),
            torch.zeros(rows, capacity, n_tokens, dtype=torch.long))

    def initial_tokens(self, seed: int, n_tokens: int) -> torch.Tensor:
        """Seed ``seed``'s first sequence (n_tokens,), drawn with ``Generator().manual_seed(seed)``."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(MAX_INITIAL_DRAWS):
            ids = self.allowed_ids[torch.randint(len(self.allowed_ids), (n_tokens,), generator=generator)]
            if not self.settings.retokenize or self.retokenizes(ids[None])[0]:
                return ids
        raise UserError(f"no sequence of {n_tokens} allowed tokens survived retokenization in {MAX_INITIAL_DRAWS} "
                        "draws; set --model.retokenize false or allow more tokens")

    def retokenizes(self, sequences: torch.Tensor) -> torch.Tensor:
        """Bool (n,): whether each sequence (n, T) decodes to a text that encodes back to the same ids."""
        keys = [tuple(row) for row in sequences.tolist()]
        todo = sorted({key for key in keys if key not in self._retokenizes})
        if todo:
            if len(self._retokenizes) + len(todo) > _RETOKENIZE_CACHE_SIZE:
                self._retokenizes.clear()
            tokenizer = self.backbone.tokenizer
            texts = tokenizer.batch_decode([list(key) for key in todo], clean_up_tokenization_spaces=False)
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            self._retokenizes.update({key: tuple(ids) == key for key, ids in zip(todo, encoded)})
        return torch.tensor([self._retokenizes[key] for key in keys], dtype=torch.bool)

    # --- what the model says -------------------------------------------------------------------------
    def values(self, embedding: torch.Tensor, tokens: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation objective and cross-entropy, each (rows, n), of n sequences per row: ``embedding`` (rows, n, T, d)
        of ``tokens`` (rows, n, T). Sequences of row r read row r's unit."""
        n_rows, n = tokens.shape[:2]
        flat, target = embedding.flatten(0, 1), self.objective.targets[0]
        units = self.objective.readout.row_units[rows].repeat_interleave(n)
        if not self.settings.fluency:  # EPO needs GPT-2 (checked by the module)
            values, final = self.backbone.hook_values(flat, target), None
        else:  # the hook and the next-token logits from one pass
            values, final = self.backbone.gpt2_hook_values(flat, target, final=True)
        activation = self.objective.objective(self.objective.readout.read(values, units)).view(n_rows, n).float()
        if final is None or tokens.shape[-1] < 2:
            return activation, torch.zeros_like(activation)
        ce = self._next_token_losses(final[:, :-1], tokens.flatten(0, 1)[:, 1:]).mean(dim=-1)
        return activation, ce.view(n_rows, n)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation objective and cross-entropy (rows, n) of token sequences (rows, n, T), forward only."""
        return self.values(self.backbone.embed_tokens(tokens), tokens, rows)

    @torch.no_grad()
    def score_children(self, members: torch.Tensor, children: torch.Tensor, position: torch.Tensor, rows: slice
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` of the children (rows, candidates, T) of ``members`` (rows, population, T), child j of member
        ``j % population`` differing from it at ``position`` (rows, candidates) only.

        On GPT-2 the positions before the swap are not recomputed: causal attention leaves them as the member's, so
        each child runs from its swapped position on, attending to its member's keys and values (a prefix cache):
        on average (T + 1) / 2T of the positions for a uniform swap position. Other models score in full.
        """
        if not self.backbone.is_gpt2:
            return self.score(children, rows)
        n_rows, population, n_tokens = members.shape
        target, readout = self.objective.targets[0], self.objective.readout
        row_units = readout.row_units[rows]
        keep: dict = {}
        values, final = self.backbone.gpt2_hook_values(self.backbone.embed_tokens(members.flatten(0, 1)), target,
                                                       keep=keep, final=self.settings.fluency)
        member_activation = readout.read(values, row_units.repeat_interleave(population))  # (rows * population, T)
        member_terms = self._next_token_losses(final[:, :-1], members.flatten(0, 1)[:, 1:]) if final is not None \
            else None
        parent = torch.arange(n_rows, device=members.device)[:, None] * population \
            + (torch.arange(children.shape[1], device=members.device) % population)[None, :]
        activation = torch.empty(children.shape[:2], device=values.device, dtype=torch.float32)  # fp32 under autocast too
        ce = torch.zeros_like(activation)
        for start in range(n_tokens):
            row, child = (position == start).nonzero(as_tuple=True)
            if not len(row):
                continue
            source, kids = parent[row, child], children[row, child]
            past = {block: (k[source, :, :start], v[source, :, :start]) for block, (k, v) in keep.items()}
            suffix, suffix_final = self.backbone.gpt2_hook_values(
                self.backbone.embed_tokens(kids[:, start:]), target, start=start, past=past,
                final=self.settings.fluency)
            per_position = torch.cat([member_activation[source, :start], readout.read(suffix, row_units[row])], dim=1)
            activation[row, child] = self.objective.objective(per_position)
            if suffix_final is not None and n_tokens > 1:
                terms = [member_terms[source, : max(start - 1, 0)]]  # earlier predictions: unchanged
                if start > 0:  # the member's last unchanged position now predicts the swapped token
                    terms.append(self._next_token_losses(final[source, start - 1 : start], kids[:, start : start + 1]))
                terms.append(self._next_token_losses(suffix_final[:, :-1], kids[:, start + 1 :]))
                ce[row, child] = torch.cat(terms, dim=1).mean(dim=1)
        return activation, ce

    def _next_token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (n, t) of GPT-2's next-token logits from final hidden states (n, t, d) against ids (n, t)."""
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), self.backbone.vocab_embeddings)  # one GEMM, never bmm
        return F.cross_entropy(logits.float(), targets.flatten(), reduction="none").view(targets.shape)

    def weights(self, like: torch.Tensor) -> torch.Tensor:
        """The members' fluency weights (population,) as a tensor like ``like``."""
        return torch.tensor(self.settings.fluency_weights, dtype=like.dtype, device=like.device)

    def top_tokens(self, tokens: torch.Tensor, chunks: list[slice]) -> torch.Tensor:
        """Per row, member and position the ``top_k`` allowed tokens of largest first-order gain of the member's
        objective, shape (rows, population, T, top_k): the objective's gradient with respect to the one-hot input
        is ``grad_embedding @ E.T`` (E the input-embedding matrix)."""
        start = chunks[0].start
        weights = self.weights(self.backbone.vocab_embeddings)
        local_chunks = [slice(rows.start - start, rows.stop - start) for rows in chunks]

        def loss(embedding: torch.Tensor, local: slice):
            rows = slice(local.start + start, local.stop + start)
            activation, ce = self.values(embedding, tokens[local], rows)
            return (-(activation - weights * ce).sum(dim=-1),)

        grad, _ = chunked_value_and_grad(loss, self.backbone.embed_tokens(tokens).detach(), local_chunks)
        vocab = self.backbone.vocab_embeddings
        blocked = ~self.allowed.to(vocab.device)
        top = []
        for local in local_chunks:
            gain = -(grad[local].to(vocab.dtype) @ vocab.T)  # (rows, population, T, V)
            gain[..., blocked] = -math.inf
            top.append(gain.topk(self.top_k, dim=-1).indices)
        return torch.cat(top)

    # --- one step ------------------------------------------------------------------------------------
    def children(self, tokens: torch.Tensor, top: torch.Tensor, rows: slice, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``candidates`` single-token swaps per row (rows, candidates, T) and their swapped positions (rows,
        candidates): child j of member ``j % population`` gets, at a uniform position, a uniform pick of that
        position's top tokens, drawn with ``step_generator``."""
        n_rows, population, n_tokens = tokens.shape
        count = self.settings.candidates
        def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = step_generator(seed, step)
            return torch.randint(n_tokens, (count,), generator=g), torch.randint(self.top_k, (count,), generator=g)

        draws = self._per_seed(range(rows.start, rows.stop), draw)
        position = torch.stack([d[0] for d in draws]).to(tokens.device)  # (rows, candidates)
        choice = torch.stack([d[1] for d in draws]).to(tokens.device)
        parent = torch.arange(count, device=tokens.device) % population
        base = tokens[:, parent]  # (rows, candidates, T)
        picked = top[torch.arange(n_rows, device=tokens.device)[:, None], parent, position, choice]
        return base.scatter(2, position[..., None], picked[..., None]), position

    def _per_seed(self, rows: range, value_of: Callable[[int], T]) -> list[T]:
        """``value_of(seed)`` for each row's seed, computed once per seed: a sweep's units of one seed share its
        random streams (swaps, restart penalties), so thousands of rows need only as many draws as seeds."""
        seeds = [self.objective.layout.seed_of(row) for row in rows]
        values = {seed: value_of(seed) for seed in dict.fromkeys(seeds)}
        return [values[seed] for seed in seeds]

    def step(self, state: SearchState, chunks: list[slice], step: int) -> tuple[SearchState, Evaluated]:
        """One GCG / EPO step of the rows in ``chunks`` (consecutive; ``state`` holds just those rows).

        Returns the rows' new state and the children it scored.
        """
        start = chunks[0].start
        local = lambda rows: slice(rows.start - start, rows.stop - start)  # noqa: E731
        if torch.isnan(state.activation).any():  # the first step: score the initial members
            scored = [self.score(state.tokens[local(rows)], rows) for rows in chunks]
            state = state._replace(activation=torch.cat([s[0] for s in scored]),
                                   cross_entropy=torch.cat([s[1] for s in scored]))
            if self.settings.fluency:
                state = self._add_to_frontier(state, state.tokens, state.activation, state.cross_entropy)
        top = self.top_tokens(state.tokens, chunks)
        drawn = [self.children(state.tokens[local(rows)], top[local(rows)], rows, step) for rows in chunks]
        children, position = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
        valid = self.retokenizes(children.flatten(0, 1)).view(children.shape[:2]).to(children.device) \
            if self.settings.retokenize else torch.ones(children.shape[:2], dtype=torch.bool, device=children.device)
        scored = [self.score_children(state.tokens[local(rows)], children[local(rows)], position[local(rows)], rows)
                  for rows in chunks]
        activation = torch.cat([s[0] for s in scored]).to(state.activation.dtype)
        ce = torch.cat([s[1] for s in scored]).to(state.activation.dtype)
        valid = valid & torch.isfinite(activation) & torch.isfinite(ce)  # a non-finite score never wins nor enters
        evaluated = Evaluated(children, activation, ce, valid)
        restart = None
        if self.settings.restarts_at(step):
            penalties = self._per_seed(range(start, chunks[-1].stop), lambda seed: restart_penalty(seed, step))
            restart = torch.tensor(penalties, dtype=activation.dtype, device=activation.device)
        state = self._select(state, evaluated, restart)
        if self.settings.fluency:
            masked_act = torch.where(valid, activation, -math.inf)
            state = self._add_to_frontier(state, children, masked_act, torch.where(valid, ce, math.inf))
        return state, evaluated

    def _select(self, state: SearchState, evaluated: Evaluated, restart: torch.Tensor | None = None) -> SearchState:
        """Each member becomes the best of the pool (members, then children) under its own weight; ties keep the
        earliest, so a member stays unless a child is strictly better. With ``restart`` (a penalty per row), every
        member of a row becomes the pool's best under that row's penalty instead (EPO's restart)."""
        act = torch.cat([state.activation, torch.where(evaluated.valid, evaluated.activation, -math.inf)], dim=1)
        ce = torch.cat([state.cross_entropy, torch.where(evaluated.valid, evaluated.cross_entropy, 0.0)], dim=1)
        tokens = torch.cat([state.tokens, evaluated.tokens], dim=1)
        population = self.settings.population
        weights = self.weights(act)[None, :, None] if restart is None else restart[:, None, None].expand(-1, population, 1)
        score = act[:, None, :] - weights * ce[:, None, :] if self.settings.fluency \
            else act[:, None, :].expand(-1, population, -1)
        best = score.argmax(dim=-1)  # (rows, population)
        return state._replace(
            tokens=tokens.gather(1, best[..., None].expand(-1, -1, tokens.shape[-1])),
            activation=act.gather(1, best), cross_entropy=ce.gather(1, best))

    def _add_to_frontier(self, state: SearchState, tokens, activation, ce) -> SearchState:
        act, front_ce, front_tokens = pareto_merge(
            (state.frontier_activation, state.frontier_cross_entropy, state.frontier_tokens),
            (activation, ce, tokens))
        return state._replace(frontier_activation=act, frontier_cross_entropy=front_ce, frontier_tokens=front_tokens)

    @staticmethod
    def best(state: SearchState) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the highest-activation sequence found so far (rows, T) and its objective (rows,): the best
        member (ties: the first), or for EPO the top of the Pareto frontier when it is higher (a restart can move
        every member off it). NaN objectives before the first step."""
        rows = torch.arange(state.tokens.shape[0], device=state.tokens.device)
        member = state.activation.argmax(dim=1)
        tokens, value = state.tokens[rows, member], state.activation[rows, member]
        if state.frontier_activation.shape[1]:
            top = state.frontier_activation.argmax(dim=1)
            higher = state.frontier_activation[rows, top] > value
            tokens = torch.where(higher[:, None], state.frontier_tokens[rows, top], tokens)
            value = torch.where(higher, state.frontier_activation[rows, top], value)
        return tokens, value

