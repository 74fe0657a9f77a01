"""End of fit, as data: per-row tensors -> frozen dataclasses (decoding, metrics, null model, data baseline).

The ``results.json`` schema is defined here, once: ``UnitResults`` for a run of one unit (a sweep's summary is
``sweep.AtlasResults``, beside its tables). ``to_json()`` gives the document (fields in declaration order; optional
sections left out when absent).
Activations are in the model's units; objectives are activations reduced over positions by ``aggregate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from amax_lightning.analysis.baseline import Overlap, TopTokens, overlap, top_tokens
from amax_lightning.analysis.convergence import Convergence
from amax_lightning.analysis.corpus_results import CorpusResult, compare_runs
from amax_lightning.analysis.logit_effects import LogitEffects, logit_effects
from amax_lightning.analysis.metrics import EmbeddingSimilarity, TokenAgreement, UniqueTokens
from amax_lightning.analysis.null_model import NullModelResult, expected_n_unique, sampled_null, unique_count_p_value
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.targets import Target
from amax_lightning.optimize.objective import RowTensors, aggregate
from amax_lightning.optimize.priors import norm_range

OPTIONAL = {"omit_if_none": True}  # field metadata: the key is left out of the JSON when the value is None


def to_json(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses become dicts in field order, without their absent optional keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


@dataclass(frozen=True)
class Protocol:
    """How a run was set up: the fields every unit's results repeat."""

    model: str
    aggregate: str
    priors: list[str]
    n_tokens: int
    lr: float
    l2: float
    seeds: list[int]  # in the run's row order
    init_scale: float  # std of the input-embedding matrix: the scale of the initial embeddings
    vocab_norm: float  # mean L2 norm of the vocabulary's embedding rows
    numerics: dict  # precision, matmul_precision, compile_mode, chunk_rows, cpu_threads
    method: str = "continuous"  # continuous (Adam on embeddings), gcg or epo (token search)
    search: Optional[dict] = None  # token search's settings (top_k, candidates, fluency_weights, ...)


@dataclass(frozen=True)
class ParetoPoint:
    """A sequence EPO evaluated that no other evaluated sequence beats on both activation and cross-entropy."""

    activation: float  # the objective (aggregated activation)
    cross_entropy: float  # the model's own mean next-token loss on the sequence, nats
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class SeedFrontier:
    """One seed's Pareto frontier, highest activation first."""

    seed: int
    frontier: list[ParetoPoint]


@dataclass(frozen=True)
class NearToken:
    """A vocabulary token near an optimized vector."""

    token_id: int
    token: str
    cosine: float


@dataclass(frozen=True)
class SeedRun:
    """One seed's optimum, decoded."""

    seed: int
    token_ids: list[int]
    tokens: list[str]
    cosine: list[float]
    final_activation: float  # the objective at the optimized input
    position_activations: list[float]
    decoded_activation: float  # the objective when the decoded token ids are fed back through the model
    decoded_position_activations: list[float]
    decoded_gap: float  # final_activation - decoded_activation: what decoding loses
    embedding_norm: list[float]  # L2 norm of each optimized vector
    nearest: list[list[NearToken]]  # per position, the 5 nearest tokens by cosine, best first



@dataclass(frozen=True)
class Uniqueness:
    """``numpy.unique`` over all seeds x positions: ``token_ids`` ascending, with their counts."""

    n_total: int
    n_unique: int
    token_ids: list[int]
    counts: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class Reproducibility:
    """Do seeds agree?  Token agreement, embedding similarity, and how token-like the optima are."""

    position_agreement: list[float]  # per position: the share of seeds on its most common token
    mean_position_agreement: float
    mean_pairwise_jaccard: float  # of the seeds' token sets
    mean_pairwise_cosine: float  # between seeds' flattened embeddings
    embedding_cosine_matrix: list[list[float]]  # seeds sorted ascending
    mean_nearest_cosine: float
    mean_decoded_gap: float
    mean_embedding_norm: float
    vocab_norm_range: list[float]  # smallest and largest vocabulary row norm


@dataclass(frozen=True)
class DataBaseline:
    """Which real tokens drive the unit highest as one-token inputs (``analysis/baseline.py``)."""

    top_tokens: Optional[TopTokens] = field(default=None, metadata=OPTIONAL)
    overlap: Optional[Overlap] = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class UnitResults:
    """The ``results.json`` of a run of one unit."""

    model: str
    target: str
    aggregate: str
    priors: list[str]
    n_tokens: int
    steps: int
    partial: bool
    lr: float
    l2: float
    seeds: list[int]  # ascending
    init_scale: float
    vocab_norm: float
    numerics: dict
    runs: list[SeedRun]  # sorted by seed
    uniqueness: Uniqueness
    reproducibility: Reproducibility
    null_model: Optional[NullModelResult] = field(default=None, metadata=OPTIONAL)
    data_baseline: Optional[DataBaseline] = field(default=None, metadata=OPTIONAL)
    sae: Optional[dict] = field(default=None, metadata=OPTIONAL)  # the SAE latent read (model/readout.py)
    direction: Optional[dict] = field(default=None, metadata=OPTIONAL)  # the direction projected on
    method: str = "continuous"  # continuous, gcg or epo; for token search decoded_gap is 0 by construction
    search: Optional[dict] = field(default=None, metadata=OPTIONAL)  # token search's settings
    pareto: Optional[list[SeedFrontier]] = field(default=None, metadata=OPTIONAL)  # EPO: per seed, sorted by seed
    logit_effects: Optional[LogitEffects] = field(default=None, metadata=OPTIONAL)  # tokens its direction promotes
    convergence: Optional[Convergence] = field(default=None, metadata=OPTIONAL)  # snapshots and their verdict
    corpus: Optional[CorpusResult] = field(default=None, metadata=OPTIONAL)  # what real text does (corpus_pass.py)

    def to_json(self) -> dict:
        return to_json(self)


def analyze_unit(protocol: Protocol, target: Target, steps: int, partial: bool, tensors: RowTensors,
                 backbone: Backbone, record: dict | None = None) -> UnitResults:
    """One unit's results from its rows' end-of-fit tensors: decoded runs sorted by seed, uniqueness, agreement.

    ``record`` describes an SAE latent (it has ``d_sae``) or a direction the unit reads."""
    local = {"sync_on_compute": False}  # rows are already gathered; one process computes
    unique, agreement, similarity = UniqueTokens(**local), TokenAgreement(**local), EmbeddingSimilarity(**local)
    unique.update(tensors.token_ids)
    agreement.update(tensors.token_ids)
    similarity.update(tensors.embedding)
    counted, agreed, similar = unique.compute(), agreement.compute(), similarity.compute()
    norms = tensors.embedding.norm(dim=-1)
    finals = aggregate(tensors.position_activations, protocol.aggregate).tolist()
    decoded = aggregate(tensors.decoded_position_activations, protocol.aggregate).tolist()
    runs = []
    for i, seed in enumerate(protocol.seeds):
        ids = tensors.token_ids[i].tolist()
        runs.append(SeedRun(
            seed=seed, token_ids=ids, tokens=backbone.token_strings(ids), cosine=tensors.cosine[i].tolist(),
            final_activation=finals[i], position_activations=tensors.position_activations[i].tolist(),
            decoded_activation=decoded[i], decoded_position_activations=tensors.decoded_position_activations[i].tolist(),
            decoded_gap=finals[i] - decoded[i], embedding_norm=norms[i].tolist(),
            nearest=[[NearToken(t, backbone.token_strings([t])[0], c) for t, c in zip(ids_t, cos_t)]
                     for ids_t, cos_t in zip(tensors.top_ids[i].tolist(), tensors.top_cosine[i].tolist())],
        ))
    runs.sort(key=lambda run: run.seed)
    order = sorted(range(len(protocol.seeds)), key=lambda i: protocol.seeds[i])
    n_vectors = len(runs) * protocol.n_tokens
    reproducibility = Reproducibility(
        position_agreement=agreed["position_agreement"],
        mean_position_agreement=agreed["mean_position_agreement"],
        mean_pairwise_jaccard=agreed["mean_pairwise_jaccard"],
        mean_pairwise_cosine=similar["mean_pairwise_cosine"],
        embedding_cosine_matrix=[[similar["matrix"][i][j] for j in order] for i in order],
        mean_nearest_cosine=sum(c for r in runs for c in r.cosine) / n_vectors,
        mean_decoded_gap=sum(r.decoded_gap for r in runs) / len(runs),
        mean_embedding_norm=sum(n for r in runs for n in r.embedding_norm) / n_vectors,
        vocab_norm_range=list(norm_range(backbone)),
    )
    return UnitResults(
        model=protocol.model, target=target.spec, aggregate=protocol.aggregate, priors=protocol.priors,
        n_tokens=protocol.n_tokens, steps=steps, partial=partial, lr=protocol.lr, l2=protocol.l2,
        seeds=sorted(protocol.seeds), init_scale=protocol.init_scale, vocab_norm=protocol.vocab_norm,
        numerics=protocol.numerics, runs=runs,
        uniqueness=Uniqueness(**counted, tokens=backbone.token_strings(counted["token_ids"])),
        reproducibility=reproducibility,
        sae=record if record and "d_sae" in record else None,
        direction=record if record and "d_sae" not in record else None,
        method=protocol.method, search=protocol.search,
    )


def with_pareto(unit: UnitResults, seeds: list[int], activation: torch.Tensor, cross_entropy: torch.Tensor,
                tokens: torch.Tensor, backbone: Backbone) -> UnitResults:
    """A unit's results with each seed's EPO frontier: ``activation``/``cross_entropy`` (seeds, F) and ``tokens``
    (seeds, F, n_tokens) in the run's seed order, empty slots at -inf activation."""
    frontiers = []
    for i, seed in enumerate(seeds):
        kept = torch.isfinite(activation[i])
        points = [ParetoPoint(a, c, ids, backbone.tokenizer.decode(ids, clean_up_tokenization_spaces=False))
                  for a, c, ids in zip(activation[i][kept].tolist(), cross_entropy[i][kept].tolist(),
                                       tokens[i][kept].tolist())]
        frontiers.append(SeedFrontier(seed, points))
    return dataclasses.replace(unit, pareto=sorted(frontiers, key=lambda f: f.seed))


def with_logit_effects(units: list[UnitResults], backbone: Backbone, targets: list[Target],
                       hook_vectors: torch.Tensor | None) -> list[UnitResults]:
    """Each unit's results with the tokens its output direction promotes and suppresses (``analysis/logit_effects.py``);
    ``hook_vectors`` (units, hook width) are what the units write into their hook's space."""
    effects = logit_effects(backbone, targets, hook_vectors)
    return [dataclasses.replace(unit, logit_effects=effect) for unit, effect in zip(units, effects)]


def with_null_model(units: list[UnitResults], vocab: torch.Tensor, scale: float, n_samples: int,
                    n_simulations: int, allowed: torch.Tensor | None = None) -> list[UnitResults]:
    """Each unit's results with the chance expectation of n_unique and the p-value of its own count added.

    The null (at most ``n_samples`` random directions drawn like the initial embeddings, std ``scale``, decoded;
    as many as the estimates' precision needs, ``null_model.sampled_null``) is computed once for all units and its
    directions kept on disk for the next run with this vocabulary; ``n_samples`` 0 returns the units unchanged.
    Token search draws its initial tokens uniformly from the ``allowed`` tokens (bool mask (V,)): then that uniform
    distribution is the null, exactly (no sampling; ``n_samples`` is recorded as 0).
    """
    if not n_samples:
        return units
    n_vectors = units[0].uniqueness.n_total
    if allowed is None:
        estimates = sampled_null(vocab, n_vectors, max_samples=n_samples, scale=scale, n_simulations=n_simulations)
        nulls = [estimates.result(unit.uniqueness.n_unique) for unit in units]
    else:
        p = allowed.double().cpu().numpy() / int(allowed.sum())
        expected = expected_n_unique(p, n_vectors)
        nulls = []
        for unit in units:
            observed = unit.uniqueness.n_unique
            p_value, se, n_sim = unique_count_p_value(p, n_vectors, observed, n_simulations, seed=0)
            nulls.append(NullModelResult(n_vectors, 0, expected, observed, p_value, n_sim, se, 0.0))
    return [dataclasses.replace(unit, null_model=null) for unit, null in zip(units, nulls)]


def with_data_baseline(unit: UnitResults, backbone: Backbone, target: Target, top_k: int, reader=None) -> UnitResults:
    """A one-unit run's results with the one-token data baseline added (``top_k`` 0: unchanged).

    ``reader(inputs_embeds) -> (batch, n_tokens)`` reads the unit (SAE latents, directions); default: the target."""
    if not top_k:
        return unit
    top = top_tokens(backbone, target, k=top_k, reader=reader)
    gradient_ids = [i for run in unit.runs for i in run.token_ids]
    return dataclasses.replace(unit, data_baseline=DataBaseline(top, overlap(gradient_ids, top.token_ids)))


def with_corpus(unit: UnitResults, result: CorpusResult, backbone: Backbone) -> UnitResults:
    """A one-unit run's results with its corpus result, compared with what the optimizer found."""
    comparison = compare_runs(result.top_token_ids, result.max, unit.runs, backbone.token_strings)
    return dataclasses.replace(unit, corpus=dataclasses.replace(result, comparison=comparison))
