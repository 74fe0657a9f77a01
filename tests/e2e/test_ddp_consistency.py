"""Under DDP every process makes the same stop decision at the same step: a non-finite row or a Ctrl-C seen by one
process stops all of them, instead of leaving the others waiting in the next collective until a timeout."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, TINY_TARGET, run_cli, run_in_process

HELPERS = str(Path(__file__).parent)
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--seeds", "0-4",
       "--trainer.max_steps", "8", "--results.null_samples", "100"]  # 5 seeds: rows 0-2 on rank 0, rows 3-4 on rank 1


def run_ddp(tiny_gpt2_dir, cwd: Path, *extra: str):
    args = ["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET, *DDP, *extra]
    return run_cli(args, cwd=cwd, timeout=120, PYTHONPATH=f"{REPO / 'src'}:{HELPERS}")  # a hang fails the test


def test_non_finite_row_in_one_process_stops_every_process(tiny_gpt2_dir, tmp_path):
    proc = run_ddp(tiny_gpt2_dir, tmp_path, "--trainer.callbacks+=signal_at.PoisonAt",
                   "--trainer.callbacks.step", "2", "--trainer.callbacks.rank", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("amax_lightning: error: non-finite loss or activation for seed(s) [3] at step 2"), last
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_ctrl_c_in_one_process_stops_every_process_at_the_same_step(tiny_gpt2_dir, tmp_path):
    proc = run_ddp(tiny_gpt2_dir, tmp_path, "--trainer.callbacks+=signal_at.SignalAt",
                   "--trainer.callbacks.signal", "SIGINT", "--trainer.callbacks.step", "2",
                   "--trainer.callbacks.rank", "1")
    assert proc.returncode != 0 and "interrupted at step" in proc.stderr, proc.stderr[-2000:]
    (path,) = tmp_path.rglob("results.json")
    partial = json.loads(path.read_text())
    assert partial["partial"] is True and partial["steps"] == 3  # step 2 finished, then every process stopped


def test_study_under_ddp_equals_one_process_and_rank_zero_writes(tiny_gpt2_dir, tmp_path):
    study = "targets: [blocks.2.hook_resid_pre:5, blocks.1.mlp.hook_post:7]\n"
    tables = []
    for name, extra in (("one", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        cwd = tmp_path / name
        cwd.mkdir()
        (cwd / "study.yaml").write_text(study)
        run = run_cli if extra else run_in_process  # DDP as a subprocess, the one-process reference here
        proc = run(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir),
                    "--seeds", "0-2", "--trainer.max_steps", "3", "--trainer.accelerator", "cpu",
                    "--results.null_samples", "100", *extra], cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == "studies/version_0/study.md"
        assert [p.name for p in (cwd / "studies").iterdir()] == ["version_0"]
        assert sorted(p.name for p in (cwd / "lightning_logs").iterdir()) == ["version_0", "version_1"]
        tables.append([json.loads((cwd / f"lightning_logs/version_{v}/results.json").read_text()) for v in (0, 1)])
    for one, ddp in zip(*tables):
        assert [r["token_ids"] for r in one["runs"]] == [r["token_ids"] for r in ddp["runs"]]
        assert one["uniqueness"] == ddp["uniqueness"]
