"""A whole SAE as one SLURM job, at full width (24,576 latents x 10 seeds = 245,760 rows) on a small model: the
README's batch script and config under ``srun`` with 2 tasks, preempted once in the end-of-fit analysis
(SIGUSR1), requeued, and finished from the blocks already written, with progress as plain lines in its log."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from cluster_runs import helpers_env
from conftest import REPO, run_in_process, save_model, tiny_gpt2_config, write_sae
from slurm_cluster import free_ports

pytestmark = pytest.mark.xdist_group("slurm")  # the session's SLURM runs on one worker
LATENTS, SEEDS = 24_576, 10
SBATCH = str(REPO / "scripts" / "slurm" / "whole_sae.sbatch")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """The tests' 3-block, 64-wide GPT-2 with a 1,024-token vocabulary (GPT-2's tokenizer; only ids below 1,024
    occur), so that decoding 1.2 million vectors is cheap on 2 cores."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return save_model(GPT2LMHeadModel(tiny_gpt2_config(vocab_size=1024)), tmp_path_factory.mktemp("small") / "gpt2")


def test_whole_sae_job_is_preempted_in_its_analysis_requeued_and_finished(slurm, small_model, tmp_path):
    sae = write_sae(tmp_path / "sae", "6.x", hook="blocks.2.hook_resid_pre", d_sae=LATENTS)
    cwd = tmp_path / "job"
    cwd.mkdir()
    env = {"AMAX_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(free_ports(1)[0]),
           **helpers_env()}
    fit = ["--config", str(REPO / "configs" / "whole_sae.yaml"), "--model.model_name_or_path", str(small_model),
           "--model.target", f"sae:{sae}:*", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
           "--checkpoint.every_n_train_steps", "1", "--threads", "1", "--model.lr", "0.01",
           "--trainer.callbacks+=signal_at.WaitInAnalysis"]
    job = slurm.run("sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", SBATCH,
                    *fit, cwd=cwd, env=env).stdout.strip()
    log = cwd / f"amax-{job}.out"
    slurm.wait(job, lambda f: (cwd / "in_analysis").exists() or f.get("JobState") not in ("RUNNING", "PENDING"),
               timeout=400)
    assert (cwd / "in_analysis").exists(), log.read_text()[-3000:]
    slurm.run("scancel", "--signal=USR1", job)
    slurm.wait(job, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING", timeout=120)
    time.sleep(2)  # a job started in the second its credential was revoked (the requeue) is killed at once
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    fields = slurm.wait_done(job, timeout=400)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-3000:]
    assert "Traceback" not in text and "\r" not in text, text[-3000:]
    assert ": requeued SLURM job" in text and "memory per process: parameter" in text
    reused = re.findall(r"reused (\d+) analysed block", text)
    assert reused and 1 <= int(reused[0]) < LATENTS // 256, text[-3000:]
    assert re.search(r"^analysis \(rank 0 of 2; each process its share\): .* units/s", text, re.M), text[-3000:]
    assert "wrote the atlas (report.html" in text

    run = cwd / "lightning_logs" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["n_units"] == LATENTS and sum(results["histogram"]) == LATENTS and results["steps"] == 2
    units = pq.read_table(run / "units.parquet", columns=["unit", "n_unique", "label"])
    assert units.column("unit").to_pylist() == list(range(LATENTS))
    rows = pq.ParquetFile(run / "rows.parquet")
    assert rows.metadata.num_rows == LATENTS * SEEDS and not (run / "blocks").exists()
    assert os.path.getsize(run / "report.html") > 1e6
    # the tokens in the merged table are the final parameter's nearest tokens (checked for a few units)
    from amax_lightning.model.decode import nearest_tokens

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    parameter = checkpoint["state_dict"]["parameter"]
    vocab = torch.load(small_model / "pytorch_model.bin", weights_only=True)["transformer.wte.weight"] \
        if (small_model / "pytorch_model.bin").exists() else None
    if vocab is None:
        from safetensors.torch import load_file

        vocab = load_file(str(small_model / "model.safetensors"))["transformer.wte.weight"]
    table = rows.read(columns=["unit", "token_ids"])
    ids = table.column("token_ids").to_pylist()
    for unit in (0, 12_345, LATENTS - 1):
        expected = nearest_tokens(parameter[unit * SEEDS : (unit + 1) * SEEDS], vocab)[0]
        assert ids[unit * SEEDS : (unit + 1) * SEEDS] == expected.tolist(), unit
    # two latents of the sweep equal the same latents run alone (one process): tokens and activations
    from amax_lightning.analysis.tables import unit_record

    for latent in (7, 20_000):
        solo = [arg if arg != f"sae:{sae}:*" else f"sae:{sae}:{latent}" for arg in fit[:-1]]
        proc = run_in_process(["fit", *solo], cwd=tmp_path / f"solo{latent}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        alone = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
        swept = unit_record(str(run), latent)
        assert [r["token_ids"] for r in swept["runs"]] == [r["token_ids"] for r in alone["runs"]]
        for key in ("position_activations", "decoded_position_activations"):
            torch.testing.assert_close(torch.tensor([r[key] for r in swept["runs"]]),
                                       torch.tensor([r[key] for r in alone["runs"]]), rtol=1e-4, atol=1e-5)
        assert swept["uniqueness"]["n_unique"] == alone["uniqueness"]["n_unique"]
