"""A checkpoint written before the layer packages (main at 58fd91c) resumes with today's code, to results.json
byte-identical to an uninterrupted run of today's code (``tests/fixtures/checkpoints_before_layers/README.md``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_in_process

FIXTURES = Path(__file__).parents[1] / "fixtures" / "checkpoints_before_layers"
ARGS = ["fit", "--model.model_name_or_path", "tiny_gpt2", "--model.target", "blocks.2.hook_resid_pre:5", "--seeds",
        "0-2", "--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "4", "--trainer.enable_progress_bar",
        "false", "--results.null_samples", "200"]
METHODS = {"continuous_clamp_step4.ckpt": ["--model.priors", "clamp", "--model.lr", "0.05"],
           "gcg_step4.ckpt": ["--model.method", "gcg", "--model.candidates", "8", "--model.top_k", "32"]}


def fit_in(folder: Path, tiny_gpt2_dir: Path, *args: str) -> Path:
    """``python -m amax_lightning fit ...`` in this process, in ``folder`` (the model as ``./tiny_gpt2``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_gpt2").symlink_to(tiny_gpt2_dir)
    proc = run_in_process(list(args), folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("fixture", sorted(METHODS))
def test_a_checkpoint_from_before_the_move_resumes_to_the_same_results(fixture, tiny_gpt2_dir, tmp_path):
    saved = torch.load(FIXTURES / fixture, weights_only=True)
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["model_name_or_path"] == "tiny_gpt2"
    uninterrupted = fit_in(tmp_path / "uninterrupted", tiny_gpt2_dir, *ARGS, *METHODS[fixture])

    resumed_folder = tmp_path / "resumed"
    (resumed_folder / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / fixture, resumed_folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = fit_in(resumed_folder, tiny_gpt2_dir, *ARGS, *METHODS[fixture], "--ckpt_path", "last")
    assert resumed == resumed_folder / "lightning_logs" / "version_0" / "results.json"  # resumed in place
    again, whole = json.loads(resumed.read_text()), json.loads(uninterrupted.read_text())
    # the checkpoint holds no snapshots (made before they existed): they start at the resume, the first without a
    # previous snapshot to compare with; everything else is byte-identical
    resumed_snapshots, whole_snapshots = again.pop("convergence")["snapshots"], whole.pop("convergence")["snapshots"]
    assert resumed_snapshots[1:] == [s for s in whole_snapshots if s["step"] > resumed_snapshots[0]["step"]]
    assert resumed_snapshots[0]["step"] > 4 and resumed_snapshots[0]["changed_fraction"] == 0.0
    assert json.dumps(again, indent=2) == json.dumps(whole, indent=2)
