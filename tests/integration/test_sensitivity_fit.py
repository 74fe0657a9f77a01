"""The sensitivity study under Trainer.fit and the sensitivity command in process, on the tiny GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TARGET
from lightning.pytorch import Trainer

from amax_lightning.lightning.sensitivity_recorder import SensitivityRecorder

SIZES = [0.0, 1e-7, 1e-3, 0.1]


def perturbed_fit(tiny_module, tmp_path, name, seeds, steps=12, snapshots=(6, 12)):
    module = tiny_module(seeds=seeds, perturb_sizes=SIZES, replicas=3, lr=1e-2)
    recorder = SensitivityRecorder(snapshots=list(snapshots))
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path / name, callbacks=[recorder]).fit(module)
    return module, recorder


def test_replicas_size_zero_equal_exactly_and_a_replica_in_the_batch_equals_it_alone(tiny_module, tmp_path):
    batched, recorder = perturbed_fit(tiny_module, tmp_path, "batched", seeds=[0, 1, 2])
    grouped = SensitivityRecorder.grouped(batched, batched.parameter.detach())  # (seeds, sizes, replicas, T, d)
    assert grouped.shape[:3] == (3, 4, 3)
    for seed in range(3):  # the control: unperturbed replicas are the same run, bit for bit
        assert torch.equal(grouped[seed, 0, 0], grouped[seed, 0, 1]) and torch.equal(grouped[seed, 0, 0], grouped[seed, 0, 2])
    assert not torch.equal(grouped[0, 3, 0], grouped[0, 3, 1])
    alone, _ = perturbed_fit(tiny_module, tmp_path, "alone", seeds=[1])
    torch.testing.assert_close(SensitivityRecorder.grouped(alone, alone.parameter.detach())[0], grouped[1],
                               rtol=1e-5, atol=1e-6)
    summary = recorder.summary
    assert [s["step"] for s in summary["snapshots"]] == [6, 12]
    curves = summary["distance_curves"]
    assert curves["steps"] == list(range(13)) and all(d == 0 for d in curves["mean_relative_distance"][0])
    start = [curve[0] for curve in curves["mean_relative_distance"][1:]]  # two replicas: about sqrt(2) x size
    assert start[1] == pytest.approx(2**0.5 * 1e-3, rel=0.3) and start[2] == pytest.approx(2**0.5 * 0.1, rel=0.3)
    last = summary["snapshots"][-1]["sizes"][0]
    assert (last["replica_token_agreement"], last["replica_distance"]) == (1.0, 0.0)
    written = json.loads((tmp_path / "batched" / "sensitivity.json").read_text())
    assert written["targets"][0]["verdict"] == summary["verdict"]


def test_perturbation_options_are_checked(tiny_module):
    from amax_lightning.base.errors import UserError

    with pytest.raises(UserError, match="replicas 3 needs perturb_sizes"):
        tiny_module(replicas=3)
    with pytest.raises(UserError, match="perturb_sizes needs one unit and method continuous"):
        tiny_module(target="blocks.2.hook_resid_pre:5,6", perturb_sizes=[0.0, 0.1], replicas=2)
    with pytest.raises(UserError, match="perturb_sizes"):
        tiny_module(perturb_sizes=[-1.0], replicas=2)
    with pytest.raises(UserError, match="replicas 1 with perturb_sizes: give at least 2"):
        tiny_module(perturb_sizes=[0.0, 0.1])
    with pytest.raises(UserError, match="perturb_sizes needs one unit and method continuous"):
        tiny_module(method="gcg", perturb_sizes=[0.1], replicas=2)


def test_sensitivity_command_end_to_end(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    from amax_lightning.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(f"targets: [{TINY_TARGET}]\nseeds: 0-1\nsizes: [0, 1.0e-7, 0.1]\nreplicas: 2\n"
                                     "snapshots: [4, 8]\nnumerics: [64-true, 32-true]\nalone: true\n")
    main(["sensitivity", "--config", "s.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "sensitivity/version_0/sensitivity.md"
    folder = tmp_path / "sensitivity" / "version_0"
    document = json.loads((folder / "sensitivity.json").read_text())
    (summary,) = document["targets"]
    variants = {v["variant"]: v for v in summary["numerics_variants"]}
    assert summary["numerics_reference"] == "64-true" and set(variants) == {"64-true", "32-true", "32-true alone"}
    assert variants["64-true"]["token_agreement"] == 1.0 and variants["32-true"]["max_abs_objective_difference"] < 1e-4
    assert summary["verdict"]["labels"] and summary["verdict"]["text"] in (folder / "sensitivity.md").read_text()
    rows = (folder / "sensitivity.csv").read_text().splitlines()
    assert rows[0].startswith("target,step,size") and len(rows) == 1 + 2 * 3  # snapshots x sizes
    for name in ("agreement_vs_size.png", "distance_vs_step.png", "agreement_vs_steps.png"):
        assert (folder / name).is_file()
    assert list(folder.glob("events.out.tfevents.*"))


def test_sensitivity_refuses_reserved_options_in_one_line(tmp_path, monkeypatch, capsys):
    from amax_lightning.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(f"targets: [{TINY_TARGET}]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", "--config", "s.yaml", "--trainer.max_steps", "3"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == (
        "amax_lightning: error: --trainer.max_steps cannot be passed to sensitivity; set snapshots in the sensitivity "
        "config")
    assert not (tmp_path / "sensitivity").exists()


def test_a_plain_fit_with_copies_records_each_step_before_an_interrupt_can_stop_it(tiny_gpt2_dir, tmp_path,
                                                                                    monkeypatch):
    """``fit --model.perturb_sizes ...`` gets one SensitivityRecorder, ahead of DeferInterrupts: a Ctrl-C takes
    effect only after the step's distances are recorded."""
    from amax_lightning.lightning.callbacks import DeferInterrupts
    from amax_lightning.lightning.cli import run_trainer

    monkeypatch.chdir(tmp_path)
    trainer = run_trainer(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET,
                           "--seeds", "0-1", "--model.perturb_sizes", "[0, 0.1]", "--model.replicas", "2",
                           "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    kinds = [type(callback) for callback in trainer.callbacks]
    assert kinds.count(SensitivityRecorder) == 1 and kinds.count(DeferInterrupts) == 1
    assert kinds.index(SensitivityRecorder) < kinds.index(DeferInterrupts)
