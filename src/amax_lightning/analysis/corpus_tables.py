"""A sweep's corpus results as two Parquet tables beside its units and rows: ``corpus.parquet`` (one row per unit:
density, max, histogram, top examples, quantile groups, each example naming its window) and
``corpus_windows.parquet`` (the token ids and strings of every window an example names, once).

Activations are float32 as computed; an example's window is its index in the pass's stream of windows.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from amax_lightning.analysis.corpus_pass import CorpusUnits
from amax_lightning.analysis.corpus_results import CorpusExample, CorpusResult, QuantileGroup, top_tokens_of
from amax_lightning.analysis.results import to_json

_floats, _ints = pa.list_(pa.float32()), pa.list_(pa.int32())
CORPUS_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("max", pa.float64()), ("density", pa.float64()), ("active", pa.int64()),
    ("histogram_edges", pa.list_(pa.float64())), ("histogram_counts", pa.list_(pa.int64())),
    ("top_window", _ints), ("top_position", _ints), ("top_max", _floats), ("top_activations", pa.list_(_floats)),
    ("quantile_low", pa.list_(pa.float64())), ("quantile_high", pa.list_(pa.float64())),
    ("quantile_fraction", pa.list_(pa.float64())), ("quantile_window", pa.list_(_ints)),
    ("quantile_position", pa.list_(_ints)), ("quantile_activations", pa.list_(pa.list_(_floats))),
])
WINDOW_SCHEMA = pa.schema([("window", pa.int32()), ("token_ids", _ints), ("tokens", pa.list_(pa.string()))])
META = b"amax_lightning.corpus"  # Parquet metadata key: the corpus's shared record (JSON)
CORPUS_TABLES = {"corpus": ("corpus.parquet", CORPUS_SCHEMA), "corpus_windows": ("corpus_windows.parquet", WINDOW_SCHEMA)}


def table_bytes(n_units: int, window: int, k: int, examples: int) -> int:
    """About the size of corpus.parquet before compression (bytes): the examples' activations dominate."""
    return n_units * (k + examples) * (window * 4 + 16)


def corpus_block_tables(units: CorpusUnits, positions: slice, first_unit: int, token_strings) -> dict[str, pa.Table]:
    """The corpus tables of pass units ``positions`` (units ``first_unit ..`` of the sweep)."""
    length, first = units.window, units.first_position
    n = positions.stop - positions.start
    top_window = units.top_window[positions]
    top_acts = units.top_acts[positions]
    counted = top_acts[:, :, first:].nan_to_num(nan=-torch.inf)
    top_position = counted.argmax(dim=-1) + first
    q = units.quantiles
    columns: dict[str, list] = {name: [] for name in CORPUS_SCHEMA.names}
    columns["unit"] = list(range(first_unit, first_unit + n))
    columns["max"] = units.max()[positions].double().tolist()
    columns["density"] = units.density()[positions].tolist()
    columns["active"] = units.active[positions].tolist()
    named: set[int] = set()
    for i in range(n):
        u = positions.start + i
        edges, counts = units.histograms[u]
        columns["histogram_edges"].append(edges)
        columns["histogram_counts"].append(counts)
        kept = (top_window[i] >= 0).nonzero(as_tuple=True)[0]
        columns["top_window"].append(top_window[i, kept].tolist())
        columns["top_position"].append(top_position[i, kept].tolist())
        columns["top_max"].append(counted[i, kept].amax(dim=-1).tolist())
        columns["top_activations"].append(top_acts[i, kept].tolist())
        named.update(top_window[i, kept].tolist())
        groups = (q.count[u] > 0).nonzero(as_tuple=True)[0].tolist()
        columns["quantile_low"].append([float(q.low[u, g]) for g in groups])
        columns["quantile_high"].append([float(q.high[u, g]) for g in groups])
        columns["quantile_fraction"].append([int(q.count[u, g]) / units.n_tokens for g in groups])
        windows, where, acts = [], [], []
        for g in groups:
            tokens = [t for t in q.token[u, g].tolist() if t >= 0]
            windows.append([t // length for t in tokens])
            where.append([t % length for t in tokens])
            acts.append(units.quantile_acts[u, g, : len(tokens)].tolist())
            named.update(t // length for t in tokens)
        columns["quantile_window"].append(windows)
        columns["quantile_position"].append(where)
        columns["quantile_activations"].append(acts)
    ids = sorted(named)
    token_ids = units.windows[ids].tolist() if ids else []
    windows_table = pa.Table.from_pydict({"window": ids, "token_ids": token_ids,
                                          "tokens": [token_strings(row) for row in token_ids]}, schema=WINDOW_SCHEMA)
    corpus = pa.Table.from_pydict(columns, schema=CORPUS_SCHEMA)
    corpus = corpus.replace_schema_metadata({META: json.dumps(units.meta()).encode()})
    return {"corpus": corpus, "corpus_windows": windows_table}


def corpus_meta(path: str) -> dict:
    """The corpus's shared record (``CorpusUnits.meta``) kept in a corpus table's metadata."""
    return json.loads(pq.read_metadata(path).metadata[META])


def merge_windows(tables: list[pa.Table]) -> pa.Table:
    """The blocks' window tables as one, each window once, in window order."""
    merged = pa.concat_tables(tables) if tables else WINDOW_SCHEMA.empty_table()
    _, first = np.unique(merged.column("window").to_numpy(), return_index=True)
    return merged.take(pa.array(first))


def read_corpus_record(folder: str, unit: int, meta: dict) -> dict | None:
    """Unit ``unit``'s corpus result from a sweep's tables, as a one-unit results.json's ``corpus`` holds it (no
    ``comparison``); None when the sweep read no corpus. ``meta`` is results.json's ``corpus``."""
    path = os.path.join(folder, CORPUS_TABLES["corpus"][0])
    if not os.path.isfile(path):
        return None
    rows = pq.read_table(path, filters=[("unit", "=", unit)]).to_pylist()
    if not rows:
        return None
    row = rows[0]
    named = set(row["top_window"]) | {w for group in row["quantile_window"] for w in group}
    windows = pq.read_table(os.path.join(folder, CORPUS_TABLES["corpus_windows"][0]),
                            filters=[("window", "in", sorted(named))]).to_pylist() if named else []
    by_id = {w["window"]: w for w in windows}

    def example(window: int, acts: list[float], position: int) -> CorpusExample:
        counted = acts[int(meta["bos_excluded"]):]
        return CorpusExample(by_id[window]["token_ids"], by_id[window]["tokens"], acts, float(max(counted)), position)

    top = [example(w, a, p) for w, a, p in zip(row["top_window"], row["top_activations"], row["top_position"])]
    groups = [QuantileGroup(low, high, fraction, [example(w, a, p) for w, a, p in zip(ws, acts, ps)])
              for low, high, fraction, ws, ps, acts in zip(row["quantile_low"], row["quantile_high"],
                                                           row["quantile_fraction"], row["quantile_window"],
                                                           row["quantile_position"], row["quantile_activations"])]
    top_ids, top_strings = top_tokens_of(top)
    result = CorpusResult(
        source=meta["source"], n_tokens=meta["n_tokens"], n_windows=meta["n_windows"], window=meta["window"],
        bos_excluded=meta["bos_excluded"], density=row["density"], density_threshold=meta["density_threshold"],
        max=row["max"], histogram={"edges": row["histogram_edges"], "counts": row["histogram_counts"]},
        top_examples=top, quantiles=groups, top_token_ids=top_ids, top_tokens=top_strings)
    return to_json(result)
