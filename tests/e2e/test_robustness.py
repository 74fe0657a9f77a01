"""Trustworthy runs: byte-identical reruns; exact resume after SIGKILL / SIGINT / SIGTERM during the steps, also
with a projecting prior; SIGINT / SIGTERM during the end-of-fit analysis stop at once; non-finite stops.

Interrupts come from the run itself at a fixed step (``signal_at.SignalAt``), so no test races the optimization.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TARGET, run_cli, run_in_process

from amax_lightning.base.errors import NonFiniteError

STEPS, EVERY, SIGNAL_STEP = 150, 25, 50
HELPERS = str(Path(__file__).parent)
SEARCH = ["--model.candidates", "8", "--model.top_k", "32", "--model.population", "2", "--trainer.max_steps", "60"]
PRIORS = {"none": ["--model.lr", "0.001"], "clamp": ["--model.priors", "clamp", "--model.lr", "0.05"],
          "gcg": ["--model.method", "gcg", *SEARCH], "epo": ["--model.method", "epo", *SEARCH]}


def study_args(folder: Path, priors: str, *extra: str) -> list[str]:
    return ["fit", "--model.model_name_or_path", str(folder), "--model.target", TINY_TARGET, "--seeds", "0-2",
            "--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", str(EVERY),
            "--trainer.enable_progress_bar", "false", "--results.null_samples", "2000", *PRIORS[priors], *extra]


def signal_args(name: str, step: int) -> list[str]:
    return ["--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.signal", name,
            "--trainer.callbacks.step", str(step)]


def run_with_helpers(args: list[str], cwd: Path):
    return run_cli(args, cwd=cwd, PYTHONPATH=f"{REPO / 'src'}:{HELPERS}")


def results_file(root: Path) -> Path:
    (path,) = root.glob("lightning_logs/version_*/results.json")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2_dir, tmp_path_factory) -> dict[str, bytes]:
    """The results.json of an uninterrupted run, per prior setting, run on first use (in this process; the runs
    compared with it are subprocesses)."""
    done: dict[str, bytes] = {}

    class Runs(dict):
        def __missing__(self, priors: str) -> bytes:
            root = tmp_path_factory.mktemp(f"uninterrupted_{priors}")
            proc = run_in_process(study_args(tiny_gpt2_dir, priors), cwd=root)
            assert proc.returncode == 0, proc.stderr[-2000:]
            self[priors] = results_file(root).read_bytes()
            return self[priors]

    return Runs(done)


def test_same_config_gives_byte_identical_results(tiny_gpt2_dir, tmp_path, uninterrupted):
    proc = run_cli(study_args(tiny_gpt2_dir, "none"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results_file(tmp_path).read_bytes() == uninterrupted["none"]


def resume_and_compare(folder: Path, cwd: Path, priors: str, uninterrupted: bytes) -> None:
    proc = run_cli(study_args(folder, priors, "--ckpt_path", "last"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((cwd / "lightning_logs").iterdir()) == [cwd / "lightning_logs" / "version_0"]  # resumed in place
    assert results_file(cwd).read_bytes() == uninterrupted


def checkpoint_of(cwd: Path) -> dict:
    return torch.load(cwd / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)


@pytest.mark.parametrize("priors", ["none", "clamp"])  # token search: tests/integration/test_token_search_fit.py
def test_resume_after_sigkill_is_exact(tiny_gpt2_dir, tmp_path, uninterrupted, priors):
    proc = run_with_helpers(study_args(tiny_gpt2_dir, priors, *signal_args("SIGKILL", SIGNAL_STEP)), tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "lightning_logs" / "version_0" / "results.json").exists()
    assert checkpoint_of(tmp_path)["global_step"] == SIGNAL_STEP
    resume_and_compare(tiny_gpt2_dir, tmp_path, priors, uninterrupted[priors])
    if priors == "clamp":  # the clamp really binds in this run, so an unprojected checkpoint would show
        high = json.loads(uninterrupted[priors])["reproducibility"]["vocab_norm_range"][1]
        norms = [n for run in json.loads(uninterrupted[priors])["runs"] for n in run["embedding_norm"]]
        assert max(norms) == pytest.approx(high, rel=1e-5)


@pytest.mark.parametrize("name, priors", [("SIGINT", "clamp"), ("SIGTERM", "none"), ("SIGINT", "gcg")])
def test_interrupt_saves_checkpoint_and_partial_results(tiny_gpt2_dir, tmp_path, uninterrupted, name, priors):
    proc = run_with_helpers(study_args(tiny_gpt2_dir, priors, *signal_args(name, SIGNAL_STEP)), tmp_path)
    assert proc.returncode != 0
    assert "interrupted at step" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    partial = json.loads(results_file(tmp_path).read_text())
    assert partial["partial"] is True and SIGNAL_STEP <= partial["steps"] <= SIGNAL_STEP + 1
    assert checkpoint_of(tmp_path)["global_step"] == partial["steps"]
    resume_and_compare(tiny_gpt2_dir, tmp_path, priors, uninterrupted[priors])
    assert json.loads(uninterrupted[priors])["partial"] is False


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 1)])
def test_interrupt_during_the_analysis_stops_at_once_and_resume_finishes_it(tiny_gpt2_dir, tmp_path, uninterrupted,
                                                                           name, code):
    """Interrupted as the null model starts decoding: the run stops at once (the pool of random directions is
    never finished, so never cached), keeps last.ckpt of the final step, writes no results; the resumed run only
    analyzes."""
    cache = tmp_path / "cache"
    proc = run_cli(study_args(tiny_gpt2_dir, "none", *signal_args(name, -1)), cwd=tmp_path,
                   PYTHONPATH=f"{REPO / 'src'}:{HELPERS}", AMAX_LIGHTNING_CACHE=str(cache))
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "interrupted during the end-of-fit analysis" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(cache.glob("null-*.npz"))
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob(".tmp-*"))
    assert checkpoint_of(tmp_path)["global_step"] == STEPS
    resume_and_compare(tiny_gpt2_dir, tmp_path, "none", uninterrupted["none"])


SWEEP = ["--model.target", "blocks.2.hook_resid_pre:0-11", "--results.block_units", "3", "--trainer.max_steps", "20"]
SWEEP_FILES = ("results.json", "units.parquet", "rows.parquet", "atlas.csv", "corpus.parquet", "corpus_windows.parquet")


def test_interrupt_during_a_sweeps_analysis_resumes_from_its_written_blocks(tiny_gpt2_dir, tmp_path):
    """SIGTERM after 2 of a sweep's 4 analysis blocks: the run stops, keeps the 2 whole blocks and writes no results;
    the resumed run analyses only the other 2, and its results and tables equal an uninterrupted run's, byte for
    byte, the corpus pass's tables too (the resumed run reads the corpus for its missing blocks' units only)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i}: <b>{i * 13 % 97}</b> apples and \u202e pears." for i in range(300)))
    args = [*study_args(tiny_gpt2_dir, "none"), *SWEEP, "--results.corpus", str(corpus),
            "--results.corpus_window", "16", "--results.corpus_tokens", "1600"]
    whole = tmp_path / "whole"
    proc = run_in_process(args, cwd=whole)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "stopped"
    proc = run_with_helpers([*args, *signal_args("SIGTERM", -2), "--trainer.callbacks.blocks", "2"], folder)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "interrupted during the end-of-fit analysis" in proc.stderr and "Traceback" not in proc.stderr
    run = folder / "lightning_logs/version_0"
    assert not (run / "results.json").exists() and not list(run.rglob(".tmp-*"))
    assert sorted(p.name for p in (run / "blocks").iterdir()) == sorted(
        f"{table}-00000{b}.parquet" for table in ("corpus", "corpus_windows", "rows", "units") for b in (0, 1))
    proc = run_cli([*args, "--ckpt_path", "last"], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reused 2 analysed block(s) of an earlier try" in proc.stderr
    for name in SWEEP_FILES:
        assert (run / name).read_bytes() == (whole / "lightning_logs/version_0" / name).read_bytes(), name
    assert not (run / "blocks").exists()


def test_non_finite_activation_stops_naming_seeds_and_step(tiny_module, tmp_path):
    from lightning.pytorch import Trainer

    module = tiny_module(seeds=[2, 7], lr=1e-3)
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


def test_ctrl_c_in_the_last_step_is_never_a_partial_result(tiny_gpt2_dir, tmp_path, uninterrupted):
    """Noted during the last step, Ctrl-C stops the run before its analysis: all steps done, nothing partial."""
    proc = run_with_helpers(study_args(tiny_gpt2_dir, "none", *signal_args("SIGINT", STEPS - 1)), tmp_path)
    assert proc.returncode == 1 and "interrupted during the end-of-fit analysis" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json")) and checkpoint_of(tmp_path)["global_step"] == STEPS
    resume_and_compare(tiny_gpt2_dir, tmp_path, "none", uninterrupted["none"])
