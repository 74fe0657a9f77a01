"""Sweeps: many units of one hook in one batch equal the same units run one at a time; atlas outputs."""

from __future__ import annotations

import csv

import torch

SEEDS = [0, 3]


def test_sweep_equals_units_run_one_at_a_time(fit_tiny, tmp_path):
    units = [3, 17, 40]
    sweep, results = fit_tiny("sweep", target="blocks.1.mlp.hook_post:3,17,40", seeds=SEEDS, lr=1e-2, steps=15, null_samples=500)
    assert results["targets"] == [f"blocks.1.mlp.hook_post:{u}" for u in units]
    assert [row["target"] for row in results["atlas"]] == results["targets"]
    for i, unit in enumerate(units):
        alone, alone_results = fit_tiny(f"unit{unit}", target=f"blocks.1.mlp.hook_post:{unit}", seeds=SEEDS, lr=1e-2, steps=15, null_samples=500)
        rows = slice(i * len(SEEDS), (i + 1) * len(SEEDS))
        torch.testing.assert_close(sweep.parameter[rows].detach(), alone.parameter.detach(), rtol=1e-5, atol=1e-6)
        swept = results["units"][i]
        assert [r["token_ids"] for r in swept["runs"]] == [r["token_ids"] for r in alone_results["runs"]]
        assert swept["uniqueness"] == {key: alone_results["uniqueness"][key] for key in ("n_total", "n_unique")}
        assert swept["null_model"] == {key: alone_results["null_model"][key] for key in ("expected_n_unique", "p_value")}
        assert [r["tokens"] for r in swept["runs"]] == [r["tokens"] for r in alone_results["runs"]]
        for key in ("position_activations", "decoded_position_activations", "cosine", "embedding_norm"):
            torch.testing.assert_close(torch.tensor([r[key] for r in swept["runs"]]),
                                       torch.tensor([r[key] for r in alone_results["runs"]]), rtol=1e-5, atol=1e-5)
        for key, value in swept["reproducibility"].items():
            assert abs(value - alone_results["reproducibility"][key]) < 1e-5, key
    with open(tmp_path / "sweep" / "atlas.csv") as handle:
        atlas = list(csv.DictReader(handle))
    assert [int(row["n_unique"]) for row in atlas] == [u["uniqueness"]["n_unique"] for u in results["units"]]


def test_attention_sweep_equals_units_run_one_at_a_time(fit_tiny, tmp_path):
    sweep, results = fit_tiny("sweep", target="blocks.1.attn.hook_k:1.2-3", seeds=SEEDS, lr=1e-2, steps=15, null_samples=500)
    assert results["targets"] == ["blocks.1.attn.hook_k:1.2", "blocks.1.attn.hook_k:1.3"]
    for i, dim in enumerate((2, 3)):
        alone, alone_results = fit_tiny(f"dim{dim}", target=f"blocks.1.attn.hook_k:1.{dim}", seeds=SEEDS, lr=1e-2, steps=15, null_samples=500)
        rows = slice(i * len(SEEDS), (i + 1) * len(SEEDS))
        torch.testing.assert_close(sweep.parameter[rows].detach(), alone.parameter.detach(), rtol=1e-5, atol=1e-6)
        assert [r["token_ids"] for r in results["units"][i]["runs"]] == [r["token_ids"] for r in alone_results["runs"]]
