"""A synthetic sweep's tables, at any width, for the atlas page's tests and benchmark: random tokens (from a given
vocabulary of strings), activations and cosines of the real shapes, written as ``analysis/sweep.py`` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from amax_lightning.analysis.results import Protocol
from amax_lightning.analysis.sweep import AtlasResults, summarize
from amax_lightning.analysis.tables import ROW_SCHEMA, UNIT_SCHEMA, merge_blocks, remove_blocks, write_table

BLOCK = 4096


def protocol(seeds: int, tokens: int) -> Protocol:
    return Protocol(model="gpt2", aggregate="mean", priors=[], n_tokens=tokens, lr=1e-3, l2=0.0,
                    seeds=list(range(seeds)), init_scale=0.14, vocab_norm=3.96, numerics={"precision": "32-true"})


def write_synthetic_sweep(folder: Path, n_units: int, vocab: list[str], seeds: int = 10, tokens: int = 5,
                          seed: int = 0, source: str = "jb-layer-8") -> AtlasResults:
    """Write ``units.parquet``, ``rows.parquet`` and ``results.json`` of an SAE sweep of ``n_units`` latents into
    ``folder``; return its summary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_vectors = seeds * tokens
    for block, start in enumerate(range(0, n_units, BLOCK)):
        units = min(BLOCK, n_units - start)
        agree = rng.integers(1, n_vectors + 1, size=units)  # how many distinct tokens each unit's seeds use
        ids = np.stack([rng.choice(rng.integers(0, len(vocab), size=k), size=n_vectors) for k in agree])
        n_unique = np.array([len(np.unique(row)) for row in ids])
        acts = rng.normal(5, 2, size=(units, n_vectors)).astype(np.float32)
        decoded = (acts * rng.uniform(0.1, 0.6, size=acts.shape)).astype(np.float32)
        p_values = rng.random(units)
        promoted = rng.integers(0, len(vocab), size=(units, 5))
        labels = np.arange(start, start + units)
        record = {"source": source, "hook": "blocks.8.hook_resid_pre", "d_sae": n_units, "activation": "pre"}
        unit_table = pa.Table.from_pydict({
            "unit": labels.astype(np.int32), "target": [f"sae:{source}:{i}" for i in labels],
            "label": [str(i) for i in labels], "n_unique": n_unique.astype(np.int32),
            "n_total": np.full(units, n_vectors, dtype=np.int32),
            "mean_final_activation": acts.mean(1).astype(float), "min_final_activation": acts.min(1).astype(float),
            "max_final_activation": acts.max(1).astype(float), "mean_decoded_activation": decoded.mean(1).astype(float),
            "mean_nearest_cosine": rng.uniform(0.05, 0.3, units), "mean_decoded_gap": (acts - decoded).mean(1).astype(float),
            "mean_embedding_norm": np.full(units, 3.1), "mean_position_agreement": rng.random(units),
            "mean_pairwise_jaccard": rng.random(units), "mean_pairwise_cosine": rng.random(units) * 0.1,
            "null_expected_n_unique": np.full(units, 49.2), "null_p_value": p_values,
            "promoted_ids": promoted.astype(np.int32).tolist(),
            "promoted_tokens": [[vocab[i] for i in row] for row in promoted.tolist()],
            "promoted_logits": np.sort(rng.random((units, 5)).astype(np.float32), axis=1)[:, ::-1].tolist(),
            "suppressed_ids": promoted.astype(np.int32).tolist(),
            "suppressed_tokens": [[vocab[i] for i in row] for row in promoted.tolist()],
            "suppressed_logits": (-rng.random((units, 5)).astype(np.float32)).tolist(),
            "stable_since": [None if r < 0.3 else int(r * 500) // 25 * 25 for r in rng.random(units)],
            "changed_fraction_last": rng.random(units) * 0.2,
            "snapshot_n_unique": [None] * units, "snapshot_changed_fraction": [None] * units,
            "snapshot_mean_objective": [None] * units,
            "record": [json.dumps({**record, "latent": int(i), "neuronpedia": f"https://www.neuronpedia.org/gpt2-small/8-res-jb/{i}"})
                       for i in labels],
        }, schema=UNIT_SCHEMA)
        flat = ids.reshape(units * seeds, tokens)
        row_table = pa.Table.from_pydict({
            "unit": np.repeat(labels, seeds).astype(np.int32), "seed": np.tile(np.arange(seeds), units),
            "token_ids": flat.astype(np.int32).tolist(), "tokens": [[vocab[i] for i in row] for row in flat.tolist()],
            "cosine": rng.uniform(0.05, 0.3, size=flat.shape).astype(np.float32).tolist(),
            "position_activations": acts.reshape(-1, tokens).tolist(),
            "decoded_position_activations": decoded.reshape(-1, tokens).tolist(),
            "embedding_norm": np.full(flat.shape, 3.1, dtype=np.float32).tolist(),
            "final_activation": acts.reshape(-1, tokens).mean(1), "decoded_activation": decoded.reshape(-1, tokens).mean(1),
        }, schema=ROW_SCHEMA)
        write_table(str(folder / "blocks" / f"rows-{block:06d}.parquet"), row_table, "synthetic")
        write_table(str(folder / "blocks" / f"units-{block:06d}.parquet"), unit_table, "synthetic")
    tables = merge_blocks(str(folder), -(-n_units // BLOCK))
    remove_blocks(str(folder))
    results = summarize(str(folder), protocol(seeds, tokens), f"sae:{source}:*", 500, False, tables,
                        {"source": source, "d_sae": n_units, "latent": 0})
    (folder / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return results
