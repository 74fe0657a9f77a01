"""A synthetic sweep's tables, at any width, for the atlas page's tests and benchmark: random tokens (from a given
vocabulary of strings), activations and cosines of the real shapes, written as ``analysis/sweep.py`` writes them; and,
unless ``corpus_windows=0``, the corpus tables of a pass over random text (``analysis/corpus_tables.py``): per unit
its top 3 windows (sparse activations, as an SAE latent's, and a large value at each window's BOS, which is not
counted), its max, density and histogram (no quantile groups: the atlas does not show them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from amax_lightning.analysis.corpus_tables import CORPUS_SCHEMA, WINDOW_SCHEMA
from amax_lightning.analysis.results import Protocol
from amax_lightning.analysis.sweep import AtlasResults, summarize
from amax_lightning.analysis.tables import (
    ROW_SCHEMA,
    UNIT_SCHEMA,
    merge_blocks,
    remove_blocks,
    table_names,
    write_table,
)

BLOCK = 4096
TOP = 3  # top examples kept per unit (a real pass keeps 20; the atlas shows 3)
BOS = 50256  # GPT-2's <|endoftext|>, each window's first token


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def corpus_windows_table(rng: np.random.Generator, vocab: list[str], n_windows: int, window: int) -> pa.Table:
    """``n_windows`` windows of random tokens, each starting with the BOS token."""
    ids = rng.integers(0, len(vocab) - 1, size=(n_windows, window))
    ids[:, 0] = min(BOS, len(vocab) - 1)
    strings = np.array(vocab, dtype=object)[ids.ravel()]
    offsets = np.arange(n_windows + 1) * window
    return pa.Table.from_arrays([pa.array(np.arange(n_windows, dtype=np.int32)),
                                 _lists(offsets, pa.array(ids.ravel().astype(np.int32))),
                                 _lists(offsets, pa.array(strings, type=pa.string()))], schema=WINDOW_SCHEMA)


def corpus_table(rng: np.random.Generator, labels: np.ndarray, n_windows: int, window: int, n_tokens: int
                 ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The corpus rows of units ``labels``; also their corpus max and density."""
    units = len(labels)
    top_max = rng.uniform(2, 12, size=(units, 1)) * np.sort(rng.uniform(0.7, 1, size=(units, TOP)), axis=1)[:, ::-1]
    top_max[:, 0] = np.maximum(top_max[:, 0], top_max[:, 1:].max(axis=1))
    acts = np.maximum(rng.normal(0, 1, size=(units, TOP, window)) - 1, 0) * top_max[:, :, None] / 4
    acts = np.minimum(acts, 0.9 * top_max[:, :, None])
    position = rng.integers(1, window, size=(units, TOP))
    np.put_along_axis(acts, position[:, :, None], top_max[:, :, None], axis=2)
    acts[:, :, 0] = rng.uniform(20, 60, size=(units, TOP))  # the BOS position's massive activation: not counted
    density = rng.uniform(0.0005, 0.3, size=units)
    active = np.round(density * n_tokens).astype(np.int64)
    edges = [np.linspace(0, m, 9).tolist() for m in top_max[:, 0]]
    counts = [rng.multinomial(a, np.full(8, 1 / 8)).tolist() for a in active]
    empty = [[] for _ in range(units)]
    top_offsets = np.arange(units + 1) * TOP
    windows = rng.integers(0, n_windows, size=(units, TOP)).astype(np.int32)
    columns = {
        "unit": pa.array(labels.astype(np.int32)), "max": pa.array(top_max[:, 0]), "density": pa.array(density),
        "active": pa.array(active), "histogram_edges": pa.array(edges), "histogram_counts": pa.array(counts),
        "top_window": _lists(top_offsets, pa.array(windows.ravel())),
        "top_position": _lists(top_offsets, pa.array(position.ravel().astype(np.int32))),
        "top_max": _lists(top_offsets, pa.array(top_max.ravel().astype(np.float32))),
        "top_activations": _lists(top_offsets, _lists(np.arange(units * TOP + 1) * window,
                                                      pa.array(acts.ravel().astype(np.float32)))),
        **{name: pa.array(empty, type=CORPUS_SCHEMA.field(name).type) for name in (
            "quantile_low", "quantile_high", "quantile_fraction", "quantile_window", "quantile_position",
            "quantile_activations")},
    }
    return pa.Table.from_pydict(columns, schema=CORPUS_SCHEMA), top_max[:, 0], density


def protocol(seeds: int, tokens: int) -> Protocol:
    return Protocol(model="gpt2", aggregate="mean", priors=[], n_tokens=tokens, lr=1e-3, l2=0.0,
                    seeds=list(range(seeds)), init_scale=0.14, vocab_norm=3.96, numerics={"precision": "32-true"})


def write_synthetic_sweep(folder: Path, n_units: int, vocab: list[str], seeds: int = 10, tokens: int = 5,
                          seed: int = 0, source: str = "jb-layer-8", corpus_windows: int = 8192,
                          window: int = 128) -> AtlasResults:
    """Write ``units.parquet``, ``rows.parquet`` and ``results.json`` of an SAE sweep of ``n_units`` latents into
    ``folder``, and the corpus tables of ``corpus_windows`` windows of ``window`` tokens (none when 0); return its
    summary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_vectors = seeds * tokens
    corpus = None
    if corpus_windows:
        corpus = {"source": "synthetic random text", "n_tokens": corpus_windows * (window - 1),
                  "n_windows": corpus_windows, "window": window, "bos_excluded": True, "density_threshold": 0.0}
        write_table(str(folder / "blocks" / "corpus_windows-000000.parquet"),
                    corpus_windows_table(rng, vocab, corpus_windows, window), "synthetic")
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
        corpus_columns = {name: [None] * units for name in ("corpus_max", "corpus_density", "optimized_over_corpus_max")}
        if corpus is not None:
            table, corpus_max, density = corpus_table(rng, labels, corpus_windows, window, corpus["n_tokens"])
            write_table(str(folder / "blocks" / f"corpus-{block:06d}.parquet"), table, "synthetic")
            if block:
                write_table(str(folder / "blocks" / f"corpus_windows-{block:06d}.parquet"),
                            WINDOW_SCHEMA.empty_table(), "synthetic")
            corpus_columns = {"corpus_max": corpus_max, "corpus_density": density,
                              "optimized_over_corpus_max": acts.max(1).astype(float) / corpus_max}
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
            **corpus_columns,
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
    tables = merge_blocks(str(folder), -(-n_units // BLOCK), table_names(corpus is not None))
    remove_blocks(str(folder))
    results = summarize(str(folder), protocol(seeds, tokens), f"sae:{source}:*", 500, False, tables,
                        {"source": source, "d_sae": n_units, "latent": 0}, corpus=corpus)
    (folder / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return results


HOSTILE_DOCUMENTS = (  # each a document of the corpus: markup, quotes, NUL, RTL marks, a very long line, empty
    "<script>alert(1)</script>", "\"quotes' & <b id=pwned>bold</b>", "\"'><img src=x onerror=alert(3)>",
    "nul \u0000 here", "\u202eevil\u200f right to left", "", "<i>a long</i> 'line' & " * 40 + "end", "{{ 7*7 }} `code` a|b",
)


def write_hostile_corpus(path: Path, repeats: int = 6) -> Path:
    """A JSON-lines corpus (field ``text``) of ``HOSTILE_DOCUMENTS``, ``repeats`` times over."""
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(repeats):
            for document in HOSTILE_DOCUMENTS:
                handle.write(json.dumps({"text": document}) + "\n")
    return path
