"""A sweep's end of fit, sharded: units are analysed in blocks of ``BLOCK_UNITS``, each block by one process, written
whole to Parquet (``analysis/tables.py``), then merged by rank 0 into the tables and a small summary.

Per unit a sweep records what its pages show: the seeds' nearest tokens (decoded by the checked fast path,
``decode.CheckedNearestTokens``: the same ids as the one-unit decode) and cosines, activations at the optimized
input and at the decoded tokens, vector norms, n_unique, token agreement, the seeds' embedding cosine, the null
model's p-value and the top ``tables.LOGIT_TOP`` logit effects. It does not record the 5 nearest neighbours of each
vector, the seeds' cosine matrix, the data baseline or EPO's Pareto frontier (one-unit runs do).

Blocks are fixed by unit index, not by process: a requeued job with another number of processes reuses the blocks
that are whole (``tables.block_is_whole``), and the merged tables equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from amax_lightning.analysis.corpus_pass import CorpusUnits
from amax_lightning.analysis.corpus_tables import corpus_block_tables
from amax_lightning.analysis.logit_effects import logit_effects
from amax_lightning.analysis.null_model import expected_n_unique, sampled_null, unique_count_p_value
from amax_lightning.analysis.results import OPTIONAL, Protocol, to_json
from amax_lightning.analysis.tables import (
    LOGIT_TOP,
    ROW_SCHEMA,
    TABLES,
    UNIT_SCHEMA,
    WRITE_ORDER,
    block_is_whole,
    block_paths,
    read_units,
    write_table,
)
from amax_lightning.base.progress import Progress
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.targets import Target
from amax_lightning.optimize.objective import RowTensors, aggregate

BLOCK_UNITS = 256  # units per block: 2,560 rows at 10 seeds; the most a preemption during the analysis redoes
SUMMARY_UNITS = 10  # units listed as most and least reproducible


def n_blocks(n_units: int, block_units: int = BLOCK_UNITS) -> int:
    return -(-n_units // block_units)


def block_units_range(block: int, n_units: int, block_units: int = BLOCK_UNITS) -> tuple[int, int]:
    """``(first unit, stop)`` of block ``block``."""
    return block * block_units, min(n_units, (block + 1) * block_units)


def blocks_of(rank: int, world_size: int, n_units: int, block_units: int = BLOCK_UNITS) -> list[int]:
    """The blocks process ``rank`` analyses: every ``world_size``-th, so the processes' shares differ by one block."""
    return list(range(rank, n_blocks(n_units, block_units), world_size))


def fingerprint(description: dict, parameter: torch.Tensor) -> str:
    """A digest of the fit state a block's results belong to: its settings (``description``, JSON-ready, with the
    step count) and a strided sample of the optimized parameter."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    flat = parameter.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 65_536)].float().cpu().numpy()
    digest.update(sample.tobytes())
    return digest.hexdigest()


# --- the numbers, for a block of units at once ------------------------------------------------------------------
def unit_metrics(token_ids: np.ndarray, cosine: np.ndarray, finals: np.ndarray, decoded: np.ndarray,
                 norms: np.ndarray, embedding: torch.Tensor) -> dict[str, np.ndarray]:
    """Per unit, from its seeds' tensors (units, seeds, ...): what ``results.analyze_unit`` computes one unit at a
    time (``metrics.UniqueTokens``, ``TokenAgreement``, ``EmbeddingSimilarity``), for all units at once.

    ``token_ids``/``cosine``/``norms`` (units, seeds, n_tokens), ``finals``/``decoded`` (units, seeds) objectives,
    ``embedding`` (units, seeds, n_tokens, d). Returns arrays of shape (units,)."""
    units, seeds, n_tokens = token_ids.shape
    flat = np.sort(token_ids.reshape(units, -1), axis=1)
    n_unique = 1 + (flat[:, 1:] != flat[:, :-1]).sum(axis=1)
    by_seed = np.sort(token_ids, axis=1)  # per position, the seeds' tokens sorted: the mode is the longest run
    run = best = np.ones((units, n_tokens), dtype=np.int64)
    for i in range(1, seeds):
        run = np.where(by_seed[:, i] == by_seed[:, i - 1], run + 1, 1)
        best = np.maximum(best, run)
    agreement = (best / seeds).mean(axis=1)
    if seeds > 1:  # Jaccard of the seeds' token sets, over pairs i < j
        first = np.ones_like(token_ids, dtype=bool)  # a token's first occurrence in its seed's row
        for t in range(1, n_tokens):
            first[:, :, t] = ~(token_ids[:, :, :t] == token_ids[:, :, t : t + 1]).any(axis=-1)
        size = first.sum(axis=-1)  # (units, seeds)
        present = (token_ids[:, :, None, :, None] == token_ids[:, None, :, None, :]).any(axis=-1)  # i's tokens in j
        both = (present & first[:, :, None, :]).sum(axis=-1)  # (units, seeds, seeds)
        i, j = np.triu_indices(seeds, k=1)
        jaccard = (both[:, i, j] / (size[:, i] + size[:, j] - both[:, i, j])).mean(axis=1)
        unit_vectors = F.normalize(embedding.reshape(units, seeds, -1).float(), dim=-1)
        matrix = (unit_vectors @ unit_vectors.transpose(1, 2)).clamp(-1.0, 1.0)
        off = ~torch.eye(seeds, dtype=torch.bool)
        pairwise = matrix[:, off].mean(dim=1).numpy().astype(np.float64)
    else:
        jaccard = pairwise = np.ones(units)
    finals64, decoded64 = finals.astype(np.float64), decoded.astype(np.float64)
    return {
        "n_unique": n_unique, "n_total": np.full(units, seeds * n_tokens),
        "mean_final_activation": finals64.mean(axis=1), "min_final_activation": finals64.min(axis=1),
        "max_final_activation": finals64.max(axis=1), "mean_decoded_activation": decoded64.mean(axis=1),
        "mean_nearest_cosine": cosine.astype(np.float64).mean(axis=(1, 2)),
        "mean_decoded_gap": (finals64 - decoded64).mean(axis=1),
        "mean_embedding_norm": norms.astype(np.float64).mean(axis=(1, 2)),
        "mean_position_agreement": agreement, "mean_pairwise_jaccard": jaccard, "mean_pairwise_cosine": pairwise,
    }


class NullLookup:
    """The null model's expected n_unique and p-value for an observed count, computed once per distinct count.

    As ``results.with_null_model``: random directions drawn like the initial embeddings and decoded (continuous), or
    the uniform draw over the ``allowed`` tokens (token search). Every process computes the same numbers from the
    same seeded draws (the decoded pool is shared through its disk cache)."""

    def __init__(self, vocab: torch.Tensor, scale: float, n_vectors: int, n_samples: int, n_simulations: int,
                 allowed: torch.Tensor | None = None, progress: bool = True) -> None:
        self.n_vectors, self.n_simulations, self.n_samples = n_vectors, n_simulations, n_samples
        self._cache: dict[int, tuple[float, float]] = {}
        self._estimates = self._p = None
        if n_samples and allowed is None:
            self._estimates = sampled_null(vocab, n_vectors, max_samples=n_samples, scale=scale,
                                           n_simulations=n_simulations, progress=progress)
            self.n_samples, self.expected = self._estimates.n_samples, self._estimates.expected
        elif n_samples:
            self._p = allowed.double().cpu().numpy() / int(allowed.sum())
            self.n_samples, self.expected = 0, expected_n_unique(self._p, n_vectors)

    @property
    def enabled(self) -> bool:
        return self._estimates is not None or self._p is not None

    def __call__(self, observed: int) -> tuple[float | None, float | None]:
        """``(expected n_unique, p-value of observed or fewer)``; ``(None, None)`` when the null model is off."""
        if not self.enabled:
            return None, None
        if observed not in self._cache:
            if self._estimates is not None:
                result = self._estimates.result(observed)
                self._cache[observed] = (result.expected_n_unique, result.p_value)
            else:
                p_value = unique_count_p_value(self._p, self.n_vectors, observed, self.n_simulations, seed=0)[0]
                self._cache[observed] = (self.expected, p_value)
        return self._cache[observed]


def convergence_columns(convergence: dict[str, torch.Tensor] | None, units: int) -> dict[str, list]:
    """The units table's convergence columns from a block's ``Snapshots.unit_arrays`` (nulls without snapshots)."""
    if not convergence:
        return {name: [None] * units for name in ("stable_since", "changed_fraction_last", "snapshot_n_unique",
                                                   "snapshot_changed_fraction", "snapshot_mean_objective")}
    since = convergence["stable_since"].tolist()
    return {"stable_since": [None if s < 0 else s for s in since],
            "changed_fraction_last": convergence["changed_fraction_last"].tolist(),
            **{name: convergence[name].tolist() for name in ("snapshot_n_unique", "snapshot_changed_fraction",
                                                             "snapshot_mean_objective")}}


def unit_label(target: Target) -> str:
    """What a unit is called in a sweep's tables: its number within the sweep's hook or SAE (``17``)."""
    return target.spec.rsplit(":", 1)[-1]


def analyze_block(protocol: Protocol, targets: list[Target], first_unit: int, tensors: RowTensors,
                  backbone: Backbone, records: list[dict | None], hook_vectors: torch.Tensor | None,
                  null: NullLookup, convergence: dict[str, torch.Tensor] | None = None,
                  corpus: tuple[CorpusUnits, slice] | None = None) -> dict[str, pa.Table]:
    """The tables (``units``, ``rows``, and with ``corpus`` its two) of units ``first_unit .. first_unit +
    len(targets)`` from their rows' end-of-fit tensors (row order: unit-major, seeds in ``protocol.seeds`` order),
    their snapshots (``convergence``: the block's rows of ``Snapshots.unit_arrays``; None or empty without
    snapshots) and their corpus results (``corpus``: the pass and these units' positions in it)."""
    units, seeds, n_tokens = len(targets), len(protocol.seeds), protocol.n_tokens
    order = np.argsort(np.asarray(protocol.seeds), kind="stable")  # runs are listed sorted by seed

    def per_unit(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().cpu().reshape(units, seeds, *tensor.shape[1:])[:, order]

    ids, cosine = per_unit(tensors.token_ids).numpy(), per_unit(tensors.cosine).float().numpy()
    acts, decoded_acts = per_unit(tensors.position_activations).float(), per_unit(tensors.decoded_position_activations).float()
    embedding = per_unit(tensors.embedding)
    norms = embedding.float().norm(dim=-1).numpy()
    finals = aggregate(acts.reshape(units * seeds, n_tokens), protocol.aggregate).reshape(units, seeds).numpy()
    decoded = aggregate(decoded_acts.reshape(units * seeds, n_tokens), protocol.aggregate).reshape(units, seeds).numpy()
    metrics = unit_metrics(ids, cosine, finals, decoded, norms, embedding)
    nulls = [null(int(n)) for n in metrics["n_unique"]]
    effects = logit_effects(backbone, targets, hook_vectors, top=LOGIT_TOP)
    sides = {}
    for side in ("promoted", "suppressed"):
        sides[f"{side}_ids"] = [None if e is None else [t.token_id for t in getattr(e, side)] for e in effects]
        sides[f"{side}_tokens"] = [None if e is None else [t.token for t in getattr(e, side)] for e in effects]
        sides[f"{side}_logits"] = [None if e is None else [t.logit for t in getattr(e, side)] for e in effects]
    unit_table = pa.Table.from_pydict({
        "unit": np.arange(first_unit, first_unit + units, dtype=np.int32),
        "target": [t.spec for t in targets], "label": [unit_label(t) for t in targets],
        **{key: metrics[key] for key in UNIT_SCHEMA.names if key in metrics},
        "null_expected_n_unique": [e for e, _ in nulls], "null_p_value": [p for _, p in nulls],
        **sides,
        "record": [None if r is None else json.dumps(r) for r in records],
        **convergence_columns(convergence, units),
        **corpus_columns(corpus, acts.amax(dim=(1, 2)), units),
    }, schema=UNIT_SCHEMA)
    flat_ids = ids.reshape(-1, n_tokens)
    strings = backbone.token_strings(np.unique(flat_ids).tolist())
    shown = dict(zip(np.unique(flat_ids).tolist(), strings))
    row_table = pa.Table.from_pydict({
        "unit": np.repeat(np.arange(first_unit, first_unit + units, dtype=np.int32), seeds),
        "seed": np.tile(np.asarray(protocol.seeds)[order], units),
        "token_ids": flat_ids.astype(np.int32).tolist(),
        "tokens": [[shown[i] for i in row] for row in flat_ids.tolist()],
        "cosine": cosine.reshape(-1, n_tokens).tolist(),
        "position_activations": acts.reshape(-1, n_tokens).tolist(),
        "decoded_position_activations": decoded_acts.reshape(-1, n_tokens).tolist(),
        "embedding_norm": norms.reshape(-1, n_tokens).tolist(),
        "final_activation": finals.reshape(-1), "decoded_activation": decoded.reshape(-1),
    }, schema=ROW_SCHEMA)
    tables = {"units": unit_table, "rows": row_table}
    if corpus is not None:
        tables.update(corpus_block_tables(*corpus, first_unit, backbone.token_strings))
    return tables


def corpus_columns(corpus: tuple[CorpusUnits, slice] | None, optimized_max: torch.Tensor, units: int
                   ) -> dict[str, list]:
    """The units table's corpus columns: the corpus max and density, and the optimized inputs' highest token
    activation (``optimized_max``, per unit) over the corpus max where that is above 0; nulls without a corpus."""
    if corpus is None:
        return {name: [None] * units for name in ("corpus_max", "corpus_density", "optimized_over_corpus_max")}
    result, positions = corpus
    top = result.max()[positions].double()
    ratio = [float(o) / float(t) if t > 0 else None for o, t in zip(optimized_max.double(), top)]
    return {"corpus_max": top.tolist(), "corpus_density": result.density()[positions].tolist(),
            "optimized_over_corpus_max": ratio}


def missing_blocks(folder: str, blocks: list[int], state: str, names: tuple[str, ...] = tuple(TABLES)) -> list[int]:
    """Those of ``blocks`` whose tables ``names`` are not already written whole for the fit state ``state``."""
    return [block for block in blocks if not block_is_whole(folder, block, state, names)]


def analyze_blocks(folder: str, blocks: list[int], n_units: int, state: str,
                   analyze: Callable[[int, int], dict[str, pa.Table]], progress: Progress,
                   block_units: int = BLOCK_UNITS) -> None:
    """Analyse and write each of ``blocks`` for the fit state ``state``; ``analyze(start, stop)`` gives a block's
    tables. The units file is written last: a block is whole once it is."""
    for block in blocks:
        start, stop = block_units_range(block, n_units, block_units)
        tables = analyze(start, stop)
        paths = block_paths(folder, block, tuple(tables))
        for name in (name for name in WRITE_ORDER if name in tables):
            write_table(paths[name], tables[name], state)
        progress.advance(stop - start)


# --- rank 0's summary -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AtlasRow:
    """One line of atlas.csv: a unit's n_unique over its seeds x positions, activations, decoded-token cosine."""

    unit: int
    label: str
    target: str
    n_unique: int
    n_total: int
    mean_final_activation: float
    min_final_activation: float
    mean_nearest_cosine: float
    mean_pairwise_jaccard: float
    null_p_value: Optional[float]
    stable_since: Optional[int]  # analysis/convergence.py; None: still changing at the last snapshot
    changed_fraction_last: Optional[float]
    corpus_max: Optional[float]  # corpus_tables.py; None: no corpus read
    corpus_density: Optional[float]
    optimized_over_corpus_max: Optional[float]


ATLAS_COLUMNS = tuple(AtlasRow.__dataclass_fields__)


@dataclass(frozen=True)
class AtlasResults:
    """The ``results.json`` of a sweep: its settings, a summary, and the tables holding every unit and row."""

    model: str
    target: str  # the sweep's target spec, e.g. ``sae:<folder>:*``
    n_units: int
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
    method: str
    tables: dict  # {"units": "units.parquet", "rows": "rows.parquet"}, in the results' folder
    n_unique: dict  # min, median, mean, max over units
    histogram: list[int]  # histogram[k]: units with n_unique k (k = 0 .. n_total)
    null_expected_n_unique: Optional[float]
    most_reproducible: list[AtlasRow]  # fewest unique tokens first
    least_reproducible: list[AtlasRow]  # most unique tokens first
    max_steps: Optional[int]
    snapshot_steps: list[int]  # the steps of the units table's snapshot_* columns
    stopped_at: int
    stop_reason: str  # max_steps, stable or interrupted
    n_settled: int  # units whose tokens had stopped changing (stable_since not null)
    search: Optional[dict] = field(default=None, metadata=OPTIONAL)
    sae: Optional[dict] = field(default=None, metadata=OPTIONAL)  # what every latent shares: source, hook, d_sae, ...
    corpus: Optional[dict] = field(default=None, metadata=OPTIONAL)  # the corpus read: source, n_tokens, window, ...

    def to_json(self) -> dict:
        return to_json(self)


def atlas_rows(units: pa.Table) -> list[AtlasRow]:
    """The atlas rows of a units table (or a slice of one)."""
    columns = units.select(list(ATLAS_COLUMNS)).to_pydict()
    return [AtlasRow(*values) for values in zip(*(columns[c] for c in ATLAS_COLUMNS))]


def ranked(units: pa.Table) -> np.ndarray:
    """Unit positions from most reproducible (fewest unique tokens, then highest mean activation) to least."""
    n_unique = units.column("n_unique").to_numpy()
    mean = units.column("mean_final_activation").to_numpy()
    return np.lexsort((-mean, n_unique))


def summarize(folder: str, protocol: Protocol, spec: str, steps: int, partial: bool, tables: dict,
              first_record: dict | None, max_steps: int | None = None, snapshot_steps: list[int] = (),
              stop_reason: str = "max_steps", corpus: dict | None = None) -> AtlasResults:
    """The sweep's summary from its merged units table in ``folder``."""
    units = read_units(folder, columns=[*ATLAS_COLUMNS, "null_expected_n_unique"])
    counts = units.column("n_unique").to_numpy()
    n_total = int(units.column("n_total")[0].as_py())
    order = ranked(units)
    expected = units.column("null_expected_n_unique")[0].as_py()
    shared = None
    if first_record and "d_sae" in first_record:
        shared = {k: v for k, v in first_record.items() if k not in ("latent", "neuronpedia")}
    return AtlasResults(
        model=protocol.model, target=spec, n_units=len(units), aggregate=protocol.aggregate, priors=protocol.priors,
        n_tokens=protocol.n_tokens, steps=steps, partial=partial, lr=protocol.lr, l2=protocol.l2,
        seeds=sorted(protocol.seeds), init_scale=protocol.init_scale, vocab_norm=protocol.vocab_norm,
        numerics=protocol.numerics, method=protocol.method, tables=tables,
        n_unique={"min": int(counts.min()), "median": int(np.sort(counts)[len(counts) // 2]),
                  "mean": float(counts.mean()), "max": int(counts.max())},
        histogram=np.bincount(counts, minlength=n_total + 1).tolist(),
        null_expected_n_unique=None if expected is None or math.isnan(expected) else float(expected),
        most_reproducible=atlas_rows(units.take(order[:SUMMARY_UNITS])),
        least_reproducible=atlas_rows(units.take(order[::-1][:SUMMARY_UNITS])),
        max_steps=max_steps, snapshot_steps=list(snapshot_steps), stopped_at=steps, stop_reason=stop_reason,
        n_settled=len(units) - units.column("stable_since").null_count,
        search=protocol.search, sae=shared, corpus=corpus,
    )
