"""A unit's corpus results as results.json holds them (``corpus``), and their comparison with what the optimizer found.

Values are the unit's activations in the model's units. ``max`` and the density count the tokens after each
window's BOS; ``top_examples`` are whole windows, best first; ``quantiles`` are equal-width intervals of
(0, highest bin edge] with the fraction of tokens in each and tokens sampled uniformly from them (sae_vis's groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from amax_lightning.analysis.corpus_pass import CorpusUnits


@dataclass(frozen=True)
class CorpusExample:
    """A window of the corpus: its tokens, the unit's activation at each, its ``max`` over the counted tokens, and
    ``position``: where that max is (a top example) or the sampled token (a quantile example)."""

    token_ids: list[int]
    tokens: list[str]
    activations: list[float]
    max: float
    position: int


@dataclass(frozen=True)
class QuantileGroup:
    """Tokens with activation in [low, high): their ``fraction`` of all counted tokens, and examples of them."""

    low: float
    high: float
    fraction: float
    examples: list[CorpusExample]


@dataclass(frozen=True)
class CorpusComparison:
    """What the optimizer reached beside what real text reaches, per token and as the objective.

    ``optimized_max_token`` is the highest activation at any position of any seed's optimized input, comparable with
    ``corpus_max`` (a single token's activation); ``optimized_objective`` and ``decoded_objective`` are the means
    over seeds of the objective (the aggregate over positions) at the optimized input and at its decoded tokens.
    ``shared_tokens``: the decoded tokens (distinct) that are among ``top_token_ids``."""

    optimized_objective: float
    optimized_max_token: float
    decoded_objective: float
    decoded_max_token: float
    corpus_max: float
    optimized_over_corpus_max: Optional[float]  # None when the corpus max is not above 0
    shared_token_ids: list[int]
    shared_tokens: list[str]


@dataclass(frozen=True)
class CorpusResult:
    """What a corpus does to one unit (``analysis/corpus_pass.py``)."""

    source: str
    n_tokens: int  # counted tokens (BOS positions excluded)
    n_windows: int
    window: int
    bos_excluded: bool  # each window starts with the model's BOS, whose position is not counted
    density: float
    density_threshold: float
    max: float
    histogram: dict  # edges (n + 1) and counts (n) of the values above density_threshold
    top_examples: list[CorpusExample]
    quantiles: list[QuantileGroup]
    top_token_ids: list[int]  # distinct tokens at the top examples' max positions, best first
    top_tokens: list[str]
    comparison: Optional[CorpusComparison] = None


def _example(ids: list[int], acts: torch.Tensor, first: int, position: int | None, strings) -> CorpusExample:
    counted = acts[first:]
    best = int(counted.argmax()) + first
    return CorpusExample(ids, strings(ids), acts.tolist(), float(acts[best]), best if position is None else position)


def top_tokens_of(examples: list[CorpusExample]) -> tuple[list[int], list[str]]:
    """The distinct tokens at the examples' positions, in the examples' order: ids and strings."""
    seen: dict[int, str] = {}
    for example in examples:
        seen.setdefault(example.token_ids[example.position], example.tokens[example.position])
    return list(seen), list(seen.values())


def corpus_result(units: CorpusUnits, u: int, token_strings) -> CorpusResult:
    """Unit ``u`` (its position in the pass) of a corpus pass; ``token_strings(ids) -> list[str]``."""
    first, length = units.first_position, units.window
    top = []
    for slot, window in enumerate(units.top_window[u].tolist()):
        if window >= 0:
            top.append(_example(units.windows[window].tolist(), units.top_acts[u, slot], first, None, token_strings))
    groups = []
    q = units.quantiles
    for g in range(q.count.shape[1]):
        if int(q.count[u, g]) == 0:
            continue
        examples = [_example(units.windows[t // length].tolist(), units.quantile_acts[u, g, s], first, t % length,
                             token_strings)
                    for s, t in enumerate(q.token[u, g].tolist()) if t >= 0]
        groups.append(QuantileGroup(float(q.low[u, g]), float(q.high[u, g]), int(q.count[u, g]) / units.n_tokens,
                                    examples))
    top_ids, top_strings = top_tokens_of(top)
    edges, counts = units.histograms[u]
    return CorpusResult(
        source=units.source, n_tokens=units.n_tokens, n_windows=units.n_windows, window=length,
        bos_excluded=bool(first), density=float(units.density()[u]), density_threshold=units.threshold,
        max=top[0].max if top else math.nan, histogram={"edges": edges, "counts": counts}, top_examples=top,
        quantiles=groups, top_token_ids=top_ids, top_tokens=top_strings)


def compare(top_token_ids: list[int], corpus_max: float, position_activations: torch.Tensor, objectives: torch.Tensor,
            decoded_position_activations: torch.Tensor, decoded_objectives: torch.Tensor, decoded_ids: list[int],
            token_strings) -> CorpusComparison:
    """The comparison of a unit's optimized inputs (per seed: activations at each position (S, T) and objective (S,);
    the same at the decoded tokens, and the decoded ids) with its corpus's top tokens and maximum."""
    optimized_max = float(position_activations.max())
    shared = sorted(set(top_token_ids).intersection(decoded_ids))
    return CorpusComparison(
        optimized_objective=float(objectives.double().mean()), optimized_max_token=optimized_max,
        decoded_objective=float(decoded_objectives.double().mean()),
        decoded_max_token=float(decoded_position_activations.max()), corpus_max=corpus_max,
        optimized_over_corpus_max=optimized_max / corpus_max if corpus_max > 0 else None,
        shared_token_ids=shared, shared_tokens=token_strings(shared))


def compare_runs(top_token_ids: list[int], corpus_max: float, runs: list, token_strings) -> CorpusComparison:
    """``compare`` from a unit's runs (``SeedRun`` objects or their results.json dicts)."""
    def field(name: str) -> list:
        return [run[name] if isinstance(run, dict) else getattr(run, name) for run in runs]

    return compare(top_token_ids, corpus_max, torch.tensor(field("position_activations")),
                   torch.tensor(field("final_activation")), torch.tensor(field("decoded_position_activations")),
                   torch.tensor(field("decoded_activation")), [i for ids in field("token_ids") for i in ids],
                   token_strings)
