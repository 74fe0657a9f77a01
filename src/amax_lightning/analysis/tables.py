"""A sweep's results as two Parquet tables, streamed to disk: one row per unit (``units.parquet``) and one row per
unit x seed (``rows.parquet``). Blocks of units are written whole (atomically) by whichever process analysed them,
then merged in unit order, one block in memory at a time. ``results.json`` names the tables (``analysis/sweep.py``).

Activations are in the model's units, float32 as computed; per-unit means are float64. ``unit_record`` reads one
unit back as the dict a one-unit ``results.json`` holds (the fields a sweep records).
"""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from amax_lightning.analysis.convergence import Snapshot, convergence_of
from amax_lightning.analysis.corpus_results import compare_runs
from amax_lightning.analysis.corpus_tables import CORPUS_TABLES, merge_windows, read_corpus_record
from amax_lightning.analysis.results import to_json
from amax_lightning.base.files import write_atomic

LOGIT_TOP = 5  # promoted and suppressed tokens kept per unit (the page shows them)
FINGERPRINT = b"amax_lightning.fingerprint"  # Parquet metadata key: the fit state a block belongs to

_floats = pa.list_(pa.float32())
UNIT_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("target", pa.string()), ("label", pa.string()),
    ("n_unique", pa.int32()), ("n_total", pa.int32()),
    ("mean_final_activation", pa.float64()), ("min_final_activation", pa.float64()),
    ("max_final_activation", pa.float64()), ("mean_decoded_activation", pa.float64()),
    ("mean_nearest_cosine", pa.float64()), ("mean_decoded_gap", pa.float64()), ("mean_embedding_norm", pa.float64()),
    ("mean_position_agreement", pa.float64()), ("mean_pairwise_jaccard", pa.float64()),
    ("mean_pairwise_cosine", pa.float64()),
    ("null_expected_n_unique", pa.float64()), ("null_p_value", pa.float64()),
    ("promoted_ids", pa.list_(pa.int32())), ("promoted_tokens", pa.list_(pa.string())), ("promoted_logits", _floats),
    ("suppressed_ids", pa.list_(pa.int32())), ("suppressed_tokens", pa.list_(pa.string())),
    ("suppressed_logits", _floats),
    ("record", pa.string()),  # JSON: the SAE latent or direction the unit reads; null for a model unit
    ("stable_since", pa.int64()), ("changed_fraction_last", pa.float64()),  # analysis/convergence.py; null: none
    ("snapshot_n_unique", pa.list_(pa.int32())), ("snapshot_changed_fraction", pa.list_(pa.float64())),
    ("snapshot_mean_objective", pa.list_(pa.float64())),  # per snapshot (results.json: snapshot_steps)
    ("corpus_max", pa.float64()), ("corpus_density", pa.float64()),  # corpus_tables.py; null: no corpus read
    ("optimized_over_corpus_max", pa.float64()),  # the optimized inputs' highest token over corpus_max (> 0 only)
])
ROW_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("seed", pa.int64()),
    ("token_ids", pa.list_(pa.int32())), ("tokens", pa.list_(pa.string())), ("cosine", _floats),
    ("position_activations", _floats), ("decoded_position_activations", _floats), ("embedding_norm", _floats),
    ("final_activation", pa.float32()), ("decoded_activation", pa.float32()),
])
TABLES = {"units": ("units.parquet", UNIT_SCHEMA), "rows": ("rows.parquet", ROW_SCHEMA)}
ALL_TABLES = {**TABLES, **CORPUS_TABLES}
WRITE_ORDER = ("rows", "corpus_windows", "corpus", "units")  # a block is whole once its units file is written


def table_names(corpus: bool) -> tuple[str, ...]:
    """The tables of a sweep's blocks: units and rows, and the corpus's two when it read one."""
    return tuple(ALL_TABLES) if corpus else tuple(TABLES)


def block_paths(folder: str, block: int, names: tuple[str, ...] = tuple(TABLES)) -> dict[str, str]:
    """The files of block ``block`` in the sweep's ``blocks`` folder, one per table in ``names``."""
    return {name: os.path.join(folder, "blocks", f"{name}-{block:06d}.parquet") for name in names}


def write_table(path: str, table: pa.Table, fingerprint: str) -> None:
    """Write ``table`` to ``path`` atomically, its metadata naming the fit state ``fingerprint``."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT: fingerprint.encode()})
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def block_is_whole(folder: str, block: int, fingerprint: str, names: tuple[str, ...] = tuple(TABLES)) -> bool:
    """Whether the files of ``block`` exist, are readable Parquet and belong to the fit state ``fingerprint``."""
    for path in block_paths(folder, block, names).values():
        try:
            metadata = pq.read_metadata(path).metadata or {}
        except (OSError, pa.ArrowException):
            return False
        if metadata.get(FINGERPRINT) != fingerprint.encode():
            return False
    return True


def merge_blocks(folder: str, n_blocks: int, names: tuple[str, ...] = tuple(TABLES)) -> dict[str, str]:
    """The sweep's tables in ``folder`` from the blocks 0..n_blocks-1, in order, one block in memory at a time
    (each block one row group); the corpus's windows once each, in window order. Returns the tables' file names."""
    for name in names:
        file_name, schema = ALL_TABLES[name]
        if name == "corpus_windows":
            table = merge_windows([pq.read_table(block_paths(folder, b, names)[name]) for b in range(n_blocks)])
            write_atomic(os.path.join(folder, file_name),
                         lambda tmp, table=table: pq.write_table(table, tmp, compression="zstd"))
            continue

        def write(tmp: str, name=name, schema=schema) -> None:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for block in range(n_blocks):
                    writer.write_table(pq.read_table(block_paths(folder, block, names)[name]).cast(schema))

        write_atomic(os.path.join(folder, file_name), write)
    return {name: ALL_TABLES[name][0] for name in names}


def remove_blocks(folder: str) -> None:
    """Delete the blocks once the merged tables and results.json are written."""
    for path in glob.glob(os.path.join(folder, "blocks", "*.parquet")):
        os.unlink(path)
    if os.path.isdir(os.path.join(folder, "blocks")):
        os.rmdir(os.path.join(folder, "blocks"))


def table_path(folder: str, name: str) -> str:
    """The path of the sweep's table ``name`` (``units`` or ``rows``) in its run folder."""
    return os.path.join(folder, TABLES[name][0])


def read_units(folder: str, columns: list[str] | None = None) -> pa.Table:
    """The sweep's per-unit table (all units; a few dozen bytes per unit and column)."""
    return pq.read_table(table_path(folder, "units"), columns=columns)


def iter_row_blocks(folder: str, columns: list[str] | None = None):
    """The per-row table one row group (one block of units) at a time, as pyarrow Tables in unit order."""
    file = pq.ParquetFile(table_path(folder, "rows"))
    for group in range(file.num_row_groups):
        yield file.read_row_group(group, columns=columns)


def unit_record(folder: str, unit: int) -> dict:
    """Unit ``unit`` of the sweep in ``folder`` as a one-unit results.json holds it: its target, record (``sae`` or
    ``direction``), ``uniqueness`` (n_total, n_unique), ``logit_effects`` (top 5 each side), ``null_model`` and
    ``runs`` (sorted by seed), with the sweep's shared settings from results.json."""
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    units = pq.read_table(table_path(folder, "units"), filters=[("unit", "=", unit)]).to_pylist()
    if not units:
        raise KeyError(f"unit {unit} is not in the sweep of {folder}")
    row = units[0]
    runs = pq.read_table(table_path(folder, "rows"), filters=[("unit", "=", unit)]).to_pylist()
    record = json.loads(row["record"]) if row["record"] else None
    shared = {key: summary[key] for key in ("model", "aggregate", "priors", "n_tokens", "steps", "partial", "lr", "l2",
                                            "seeds", "init_scale", "vocab_norm", "numerics", "method")}
    runs = [{key: value for key, value in run.items() if key != "unit"} for run in sorted(runs, key=lambda r: r["seed"])]
    corpus = read_corpus_record(folder, unit, summary["corpus"]) if summary.get("corpus") else None
    if corpus is not None:  # as a one-unit run records it: with the comparison (strings as the rows hold them)
        strings = {i: t for run in runs for i, t in zip(run["token_ids"], run["tokens"])}
        comparison = compare_runs(corpus["top_token_ids"], corpus["max"], runs, lambda ids: [strings[i] for i in ids])
        corpus["comparison"] = to_json(comparison)
    return {
        **shared, "target": row["target"], "runs": runs,
        "uniqueness": {"n_total": row["n_total"], "n_unique": row["n_unique"]},
        "reproducibility": {key: row[key] for key in ("mean_position_agreement", "mean_pairwise_jaccard",
                                                      "mean_pairwise_cosine", "mean_nearest_cosine",
                                                      "mean_decoded_gap", "mean_embedding_norm")},
        "null_model": None if row["null_p_value"] is None else {
            "expected_n_unique": row["null_expected_n_unique"], "p_value": row["null_p_value"]},
        "logit_effects": None if row["promoted_ids"] is None else {
            side: [{"token_id": i, "token": t, "logit": v} for i, t, v in
                   zip(row[f"{side}_ids"], row[f"{side}_tokens"], row[f"{side}_logits"])]
            for side in ("promoted", "suppressed")},
        "convergence": None if row["snapshot_n_unique"] is None else to_json(convergence_of(
            [Snapshot(*values) for values in zip(summary["snapshot_steps"], row["snapshot_n_unique"],
                                                 row["snapshot_changed_fraction"], row["snapshot_mean_objective"])],
            summary["stopped_at"], summary["stop_reason"], row["n_total"], summary["max_steps"])),
        **({"sae": record} if record and "d_sae" in record else {}),
        **({"direction": record} if record and "d_sae" not in record else {}),
        **({"corpus": corpus} if corpus is not None else {}),
    }
