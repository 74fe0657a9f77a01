"""Slow paths run end to end: torch.compile of the step, and a whole-hook sweep from the CLI."""

from __future__ import annotations

import json

import torch
from conftest import run_cli, sweep_view


def test_compiled_step_matches_eager(fit_tiny):
    eager, eager_results = fit_tiny("eager", lr=1e-2, steps=6)
    compiled, compiled_results = fit_tiny("compiled", lr=1e-2, steps=6, compile_mode="default")
    assert compiled_results["numerics"]["compile_mode"] == "default"
    assert compiled.algorithm._compiled_forward is not None  # really went through torch.compile
    torch.testing.assert_close(compiled.parameter.detach(), eager.parameter.detach(), rtol=1e-5, atol=1e-6)
    assert [r["token_ids"] for r in compiled_results["runs"]] == [r["token_ids"] for r in eager_results["runs"]]


def test_sweep_of_every_unit_from_the_cli(tiny_gpt2_dir, tmp_path):
    proc = run_cli(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target",
                    "blocks.2.hook_resid_pre:*", "--seeds", "0-1", "--trainer.max_steps", "3",
                    "--results.null_samples", "500"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "lightning_logs" / "version_0"
    results = sweep_view(str(folder / "results.json"), json.loads((folder / "results.json").read_text()))
    assert not (folder / "blocks").exists()  # merged into the tables, then removed
    assert len(results["units"]) == len(results["atlas"]) == 64
    assert all(unit["uniqueness"]["n_total"] == 10 for unit in results["units"])
    assert (folder / "atlas.png").is_file() and (folder / "report.md").is_file()
    assert "sweep of 64 units" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = folder.glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"histograms": 0}).Reload()
    (histogram,) = events.Histograms("atlas/n_unique")
    counts = [row["n_unique"] for row in results["atlas"]]
    assert histogram.histogram_value.num == 64 and histogram.histogram_value.min == min(counts)
    assert histogram.histogram_value.max == max(counts) and histogram.step == 3
