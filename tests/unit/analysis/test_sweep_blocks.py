"""A sweep's block analysis: its vectorized per-unit numbers equal the one-unit metrics (torchmetrics, one unit at a
time); blocks are assigned, fingerprinted, written whole and merged in unit order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from amax_lightning.analysis.metrics import EmbeddingSimilarity, TokenAgreement, UniqueTokens
from amax_lightning.analysis.sweep import block_units_range, blocks_of, fingerprint, n_blocks, unit_metrics
from amax_lightning.analysis.tables import (
    UNIT_SCHEMA,
    block_is_whole,
    block_paths,
    merge_blocks,
    read_units,
    remove_blocks,
    write_table,
)


@pytest.mark.parametrize("seeds", [1, 2, 10])
def test_block_metrics_equal_the_one_unit_metrics(seeds):
    rng = np.random.default_rng(seeds)
    units, n_tokens, d = 7, 5, 6
    ids = rng.integers(0, 6, size=(units, seeds, n_tokens))  # a small vocabulary: repeats within and across seeds
    ids[0] = ids[0, :1]  # a unit whose seeds all agree
    cosine = rng.random((units, seeds, n_tokens)).astype(np.float32)
    finals, decoded = (rng.normal(size=(units, seeds)).astype(np.float32) for _ in range(2))
    embedding = torch.randn(units, seeds, n_tokens, d)
    norms = embedding.norm(dim=-1).numpy()
    got = unit_metrics(ids, cosine, finals, decoded, norms, embedding)
    for u in range(units):
        local = {"sync_on_compute": False}
        unique, agreement, similarity = UniqueTokens(**local), TokenAgreement(**local), EmbeddingSimilarity(**local)
        unique.update(torch.from_numpy(ids[u]))
        agreement.update(torch.from_numpy(ids[u]))
        similarity.update(embedding[u])
        counted, agreed, similar = unique.compute(), agreement.compute(), similarity.compute()
        assert got["n_unique"][u] == counted["n_unique"] and got["n_total"][u] == counted["n_total"]
        assert got["mean_position_agreement"][u] == pytest.approx(agreed["mean_position_agreement"], abs=1e-12)
        assert got["mean_pairwise_jaccard"][u] == pytest.approx(agreed["mean_pairwise_jaccard"], abs=1e-12)
        assert got["mean_pairwise_cosine"][u] == pytest.approx(similar["mean_pairwise_cosine"], abs=1e-6)
        assert got["mean_nearest_cosine"][u] == pytest.approx(float(np.mean(cosine[u], dtype=np.float64)))
        assert got["mean_decoded_gap"][u] == pytest.approx(float(np.mean(finals[u].astype(float) - decoded[u])))
        assert got["min_final_activation"][u] == float(finals[u].min())
    assert got["n_unique"][0] == len(set(ids[0, 0].tolist())) and got["mean_position_agreement"][0] == 1.0


def test_blocks_cover_every_unit_once_and_balance_the_processes():
    n_units, size = 1000, 64
    assert n_blocks(n_units, size) == 16 and block_units_range(15, n_units, size) == (960, 1000)
    for world in (1, 2, 3, 16, 20):
        shares = [blocks_of(rank, world, n_units, size) for rank in range(world)]
        assert sorted(b for share in shares for b in share) == list(range(16))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_fingerprint_changes_with_the_settings_and_the_parameter():
    parameter = torch.randn(40, 5, 8)
    base = fingerprint({"steps": 10}, parameter)
    assert fingerprint({"steps": 10}, parameter.clone()) == base
    assert fingerprint({"steps": 11}, parameter) != base
    changed = parameter.clone()
    changed[0, 0, 0] += 1
    assert fingerprint({"steps": 10}, changed) != base


def units_table(first: int, count: int) -> pa.Table:
    rows = {name: [None] * count for name in UNIT_SCHEMA.names}
    rows.update(unit=list(range(first, first + count)), target=[f"t:{i}" for i in range(first, first + count)],
                label=[str(i) for i in range(first, first + count)], n_unique=[3] * count, n_total=[10] * count)
    return pa.Table.from_pydict(rows, schema=UNIT_SCHEMA)


def test_blocks_are_whole_only_for_their_fit_state_and_merge_in_unit_order(tmp_path):
    from amax_lightning.analysis.tables import ROW_SCHEMA

    empty_rows = ROW_SCHEMA.empty_table()
    for block in (1, 0):  # written out of order, as processes finish
        paths = block_paths(str(tmp_path), block)
        write_table(paths["rows"], empty_rows, "state-a")
        write_table(paths["units"], units_table(block * 3, 3), "state-a")
    assert block_is_whole(str(tmp_path), 0, "state-a") and not block_is_whole(str(tmp_path), 0, "state-b")
    assert not block_is_whole(str(tmp_path), 2, "state-a")
    (tmp_path / "blocks" / "units-000001.parquet").write_bytes(b"half a file")
    assert not block_is_whole(str(tmp_path), 1, "state-a")
    write_table(block_paths(str(tmp_path), 1)["units"], units_table(3, 3), "state-a")
    assert merge_blocks(str(tmp_path), 2) == {"units": "units.parquet", "rows": "rows.parquet"}
    assert read_units(str(tmp_path)).column("unit").to_pylist() == list(range(6))
    remove_blocks(str(tmp_path))
    assert not (tmp_path / "blocks").exists()
