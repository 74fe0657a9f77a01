"""Trustworthy runs: byte-identical reruns, exact resume after SIGKILL / SIGINT / SIGTERM, non-finite stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amax_lightning.errors import NonFiniteError
from amax_lightning.module import ActMaxModule
from conftest import REPO, TINY_TARGET, run_cli

STEPS, EVERY = 1500, 100


def study_args(folder: Path, *extra: str) -> list[str]:
    return ["fit", "--model.model_name_or_path", str(folder), "--model.target", TINY_TARGET, "--seeds", "0-2",
            "--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", str(EVERY),
            "--trainer.enable_progress_bar", "false", *extra]


def results_file(root: Path) -> Path:
    (path,) = root.glob("lightning_logs/version_*/results.json")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2_dir, tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(study_args(tiny_gpt2_dir), cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return results_file(root).read_bytes()


def test_same_config_gives_byte_identical_results(tiny_gpt2_dir, tmp_path, uninterrupted):
    proc = run_cli(study_args(tiny_gpt2_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results_file(tmp_path).read_bytes() == uninterrupted


def start_and_wait_for_checkpoint(folder: Path, cwd: Path) -> subprocess.Popen:
    """Start the study in a subprocess and return once its first last.ckpt exists (the run still going)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "amax_lightning", *study_args(folder)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if CI ignores it
    checkpoint = cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return proc


def resume_and_compare(folder: Path, cwd: Path, uninterrupted: bytes) -> None:
    proc = run_cli(study_args(folder, "--ckpt_path", "last"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((cwd / "lightning_logs").iterdir()) == [cwd / "lightning_logs" / "version_0"]  # resumed in place
    assert results_file(cwd).read_bytes() == uninterrupted


def test_resume_after_sigkill_is_exact(tiny_gpt2_dir, tmp_path, uninterrupted):
    proc = start_and_wait_for_checkpoint(tiny_gpt2_dir, tmp_path)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "lightning_logs" / "version_0" / "results.json").exists()
    resume_and_compare(tiny_gpt2_dir, tmp_path, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_checkpoint_and_partial_results(tiny_gpt2_dir, tmp_path, uninterrupted, signum):
    proc = start_and_wait_for_checkpoint(tiny_gpt2_dir, tmp_path)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    partial = json.loads(results_file(tmp_path).read_text())
    assert partial["partial"] is True and EVERY <= partial["steps"] < STEPS
    saved = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == partial["steps"]
    resume_and_compare(tiny_gpt2_dir, tmp_path, uninterrupted)
    assert json.loads(uninterrupted)["partial"] is False


def test_non_finite_activation_stops_naming_seeds_and_step(tiny_gpt2_dir, tmp_path):
    from lightning.pytorch import Trainer

    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=TINY_TARGET, seeds=[2, 7], lr=1e-3)
    with torch.no_grad():
        module.parameter[1, 0, 0] = float("nan")  # seed 7 is broken from the start
    trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteError, match=r"seed\(s\) \[7\] at step 0"):
        trainer.fit(module)
    assert list(tmp_path.iterdir()) == []


def test_overflowing_loss_stops_with_one_line_and_no_results(tiny_gpt2_dir, tmp_path):
    proc = run_cli(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET,
                    "--seed", "0", "--model.l2", "1e300", "--trainer.max_steps", "50"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("amax_lightning: error: non-finite loss or activation for seed(s) [0] at step"), last
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_a_new_run_claims_a_version_folder_no_other_run_has(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from amax_lightning.cli import claim_new_version

    logger = TensorBoardLogger(tmp_path, name="lightning_logs")
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    monkeypatch.setattr(logger, "_get_next_version", lambda: 0)  # as if another run took version_0 just now
    claim_new_version(logger)
    assert logger.version == 1 and (tmp_path / "lightning_logs" / "version_1").is_dir()
