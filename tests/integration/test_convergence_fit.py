"""Snapshots in a fit: the snapshot at step S holds the tokens of a fit to step S (continuous and GCG); the stop when
stable is where the snapshots say; a resumed fit continues the same snapshots; sweeps record them per unit; bad
values are one line."""

from __future__ import annotations

import pytest
import torch

import amax_lightning.lightning.snapshots as snapshots_module

SEARCH = {"method": "gcg", "candidates": 8, "top_k": 32}


@pytest.fixture
def recorded(monkeypatch):
    """Every snapshot's tokens (rows, n_tokens), by step, as the fit decoded them."""
    tokens: dict[int, torch.Tensor] = {}
    decode = snapshots_module.current_tokens

    def record(module, *args):
        ids = decode(module, *args)
        tokens[module.trainer.global_step] = ids.clone()
        return ids

    monkeypatch.setattr(snapshots_module, "current_tokens", record)
    return tokens


@pytest.mark.parametrize("options", [{"lr": 1e-2}, SEARCH], ids=["continuous", "gcg"])
def test_a_fit_to_step_s_equals_the_snapshot_at_s_of_a_longer_fit(fit_tiny, recorded, options):
    _, longer = fit_tiny("longer", steps=40, writer_options={"snapshot_every": 10}, **options)
    at_20 = recorded[20]
    _, shorter = fit_tiny("shorter", steps=20, writer_options={"snapshot_every": 10}, **options)
    assert [run["token_ids"] for run in shorter["runs"]] == at_20.tolist()  # seeds 0, 1, 2: run order is seed order
    assert shorter["convergence"]["snapshots"] == longer["convergence"]["snapshots"][:2]
    assert [s["step"] for s in longer["convergence"]["snapshots"]] == [10, 20, 30, 40]
    last = longer["convergence"]["snapshots"][-1]
    assert last["n_unique"] == longer["uniqueness"]["n_unique"]  # the last snapshot is the end of the fit
    assert longer["convergence"]["stopped_at"] == 40 and longer["convergence"]["stop_reason"] == "max_steps"


def test_stop_when_stable_stops_where_the_snapshots_of_the_whole_fit_say(fit_tiny, recorded):
    options = {"lr": 1e-2, "seeds": [0, 1, 2, 3]}
    _, whole = fit_tiny("whole", steps=300, writer_options={"snapshot_every": 10}, **options)
    snapshots = whole["convergence"]["snapshots"]
    changed = [s["changed_fraction"] > 0 for s in snapshots]
    patience = 3
    stop = next(s["step"] for i, s in enumerate(snapshots) if i >= patience and not any(changed[i - patience + 1 : i + 1]))
    assert stop < 300, "the whole fit must settle before its end for this test to mean anything"
    tokens_at_stop = recorded[stop]
    module, stopped = fit_tiny("stopped", steps=300, writer_options={"snapshot_every": 10, "stop_when_stable": patience},
                               **options)
    convergence = stopped["convergence"]
    assert module.trainer.global_step == stopped["steps"] == convergence["stopped_at"] == stop
    assert convergence["stop_reason"] == "stable" and "stopped early at step" in convergence["verdict"]
    assert convergence["snapshots"] == [s for s in snapshots if s["step"] <= stop]
    assert [run["token_ids"] for run in stopped["runs"]] == tokens_at_stop.tolist()
    since = [s["step"] for s in snapshots if s["step"] <= stop]
    assert convergence["stable_since"] in since and convergence["stable_since"] <= stop - 10 * patience


def test_a_resumed_fit_continues_the_same_snapshots(fit_tiny, tmp_path):
    options = {"lr": 1e-2}
    _, whole = fit_tiny("whole", steps=12, writer_options={"snapshot_every": 2}, **options)
    fit_tiny("first", steps=6, writer_options={"snapshot_every": 2}, trainer_options={"enable_checkpointing": True},
             **options)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    _, again = fit_tiny("resumed", steps=12, writer_options={"snapshot_every": 2},
                        fit_options={"ckpt_path": str(checkpoint), "weights_only": True}, **options)
    assert again["convergence"] == whole["convergence"]


def test_a_fit_stopped_as_stable_and_resumed_runs_no_more_steps(fit_tiny, tmp_path):
    options = {"lr": 1e-2, "seeds": [0, 1, 2, 3]}
    writer = {"snapshot_every": 10, "stop_when_stable": 3}
    _, stopped = fit_tiny("stopped", steps=300, writer_options=writer, trainer_options={"enable_checkpointing": True},
                          **options)
    assert stopped["convergence"]["stop_reason"] == "stable"
    (checkpoint,) = (tmp_path / "stopped").rglob("*.ckpt")  # as if killed during its analysis
    module, again = fit_tiny("resumed", steps=300, writer_options=writer,
                             fit_options={"ckpt_path": str(checkpoint), "weights_only": True}, **options)
    assert again == stopped and module.trainer.global_step == stopped["steps"]


def test_a_sweep_records_each_units_snapshots_and_verdict(fit_tiny):
    units = [3, 17]
    _, sweep = fit_tiny("sweep", steps=30, writer_options={"snapshot_every": 5},
                        target="blocks.1.mlp.hook_post:3,17", lr=1e-2)
    assert sweep["snapshot_steps"] == [5, 10, 15, 20, 25, 30] and sweep["stop_reason"] == "max_steps"
    for i, unit in enumerate(units):
        _, alone = fit_tiny(f"alone{unit}", steps=30, writer_options={"snapshot_every": 5},
                            target=f"blocks.1.mlp.hook_post:{unit}", lr=1e-2)
        swept = sweep["units"][i]["convergence"]
        assert [s["n_unique"] for s in swept["snapshots"]] == [s["n_unique"] for s in alone["convergence"]["snapshots"]]
        assert [s["changed_fraction"] for s in swept["snapshots"]] == [
            s["changed_fraction"] for s in alone["convergence"]["snapshots"]]
        assert swept["stable_since"] == alone["convergence"]["stable_since"]
        assert swept["verdict"] == alone["convergence"]["verdict"]
        assert sweep["atlas"][i]["stable_since"] == alone["convergence"]["stable_since"]


@pytest.mark.parametrize("flag, value, message", [
    ("--results.snapshot_every", "0", "results.snapshot_every 0 is out of range"),
    ("--results.snapshot_every", "9", "results.snapshot_every 9 is out of range; this fit's max_steps 5 allows 1..5"),
    ("--results.snapshot_every", "x", "results.snapshot_every"),
    ("--results.stop_when_stable", "0", "results.stop_when_stable 0 is out of range"),
])
def test_bad_snapshot_values_are_one_line_and_write_nothing(tiny_gpt2_dir, tmp_path, flag, value, message):
    from conftest import TINY_TARGET, run_in_process

    proc = run_in_process(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET,
                           "--trainer.max_steps", "5", flag, value], cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("amax_lightning: error: ") and message in line, line
    assert list(tmp_path.iterdir()) == []
