"""Sweeps: many units of one hook in one batch equal the same units run one at a time; atlas outputs."""

from __future__ import annotations

import csv

import torch

from amax_lightning.lightning.module import gigabytes

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


def sweep_args(tiny_gpt2_dir, *extra: str) -> list[str]:
    return ["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", "blocks.2.hook_resid_pre:*",
            "--seeds", "0-1", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", *extra]


def test_a_sweep_states_its_memory_before_the_first_step(tiny_gpt2_dir, tmp_path):
    from conftest import run_in_process

    proc = run_in_process(sweep_args(tiny_gpt2_dir, "--results.null_samples", "0"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if "memory per process" in line]
    parameter = 64 * 2 * 5 * 64 * 4  # units x seeds x tokens x d_model, fp32
    assert f"parameter {gigabytes(parameter)}" in line and f"Adam state {gigabytes(2 * parameter)}" in line
    assert f"last.ckpt about {gigabytes(3 * parameter)}" in line


def test_a_sweep_that_cannot_fit_stops_before_any_step(tiny_gpt2_dir, tmp_path, monkeypatch):
    from conftest import run_in_process

    import amax_lightning.lightning.module as module

    monkeypatch.setattr(module, "free_memory_bytes", lambda device: 200_000)
    proc = run_in_process(sweep_args(tiny_gpt2_dir), cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("amax_lightning: error: this run needs") and "units x 2 seeds fit" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_null_model_too_large_is_refused_before_any_step(tiny_gpt2_dir, tmp_path):
    from conftest import run_in_process

    proc = run_in_process(sweep_args(tiny_gpt2_dir, "--seeds", "0-9999", "--model.target",
                                     "blocks.2.hook_resid_pre:0-1", "--model.n_tokens", "11"), cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "needs 1100000 random directions" in line and "results.null_samples 0" in line, line
    assert list(tmp_path.iterdir()) == []
