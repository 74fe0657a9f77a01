"""Sweeps: many units of one hook in one batch equal the same units run one at a time; atlas outputs."""

from __future__ import annotations

import csv
import json

import torch
from lightning.pytorch import Trainer

from amax_lightning.callbacks import ResultsWriter
from amax_lightning.module import ActMaxModule
from conftest import run_cli

SEEDS = [0, 3]


def fit(folder, tmp_path, target: str) -> tuple[ActMaxModule, dict]:
    module = ActMaxModule(model_name_or_path=str(folder), target=target, seeds=SEEDS, lr=1e-2)
    trainer = Trainer(max_steps=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[ResultsWriter(null_samples=500)])
    trainer.fit(module)
    with open(tmp_path / "results.json") as handle:
        return module, json.load(handle)


def test_sweep_equals_units_run_one_at_a_time(tiny_gpt2_dir, tmp_path):
    units = [3, 17, 40]
    sweep, results = fit(tiny_gpt2_dir, tmp_path / "sweep", "blocks.1.mlp.hook_post:3,17,40")
    assert results["targets"] == [f"blocks.1.mlp.hook_post:{u}" for u in units]
    assert [row["target"] for row in results["atlas"]] == results["targets"]
    for i, unit in enumerate(units):
        alone, alone_results = fit(tiny_gpt2_dir, tmp_path / f"unit{unit}", f"blocks.1.mlp.hook_post:{unit}")
        rows = slice(i * len(SEEDS), (i + 1) * len(SEEDS))
        torch.testing.assert_close(sweep.parameter[rows].detach(), alone.parameter.detach(), rtol=1e-5, atol=1e-6)
        swept = results["units"][i]
        assert [r["token_ids"] for r in swept["runs"]] == [r["token_ids"] for r in alone_results["runs"]]
        assert swept["uniqueness"] == alone_results["uniqueness"]
        assert swept["null_model"] == alone_results["null_model"]
    with open(tmp_path / "sweep" / "atlas.csv") as handle:
        atlas = list(csv.DictReader(handle))
    assert [int(row["n_unique"]) for row in atlas] == [u["uniqueness"]["n_unique"] for u in results["units"]]


def test_sweep_of_every_unit_from_the_cli(tiny_gpt2_dir, tmp_path):
    proc = run_cli(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target",
                    "blocks.2.hook_resid_pre:*", "--seeds", "0-1", "--trainer.max_steps", "3",
                    "--results.null_samples", "500"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "lightning_logs" / "version_0"
    results = json.loads((folder / "results.json").read_text())
    assert len(results["units"]) == len(results["atlas"]) == 64
    assert all(unit["uniqueness"]["n_total"] == 10 for unit in results["units"])
    assert (folder / "atlas.png").is_file() and (folder / "report.md").is_file()
    assert "sweep of 64 units" in proc.stdout


def test_attention_sweep_equals_units_run_one_at_a_time(tiny_gpt2_dir, tmp_path):
    sweep, results = fit(tiny_gpt2_dir, tmp_path / "sweep", "blocks.1.attn.hook_k:1.2-3")
    assert results["targets"] == ["blocks.1.attn.hook_k:1.2", "blocks.1.attn.hook_k:1.3"]
    for i, dim in enumerate((2, 3)):
        alone, alone_results = fit(tiny_gpt2_dir, tmp_path / f"dim{dim}", f"blocks.1.attn.hook_k:1.{dim}")
        rows = slice(i * len(SEEDS), (i + 1) * len(SEEDS))
        torch.testing.assert_close(sweep.parameter[rows].detach(), alone.parameter.detach(), rtol=1e-5, atol=1e-6)
        assert [r["token_ids"] for r in results["units"][i]["runs"]] == [r["token_ids"] for r in alone_results["runs"]]
