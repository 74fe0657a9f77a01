"""On a real single-host SLURM (the session's ``slurm`` fixture): the batch script of the README as written, ``srun -n
2``, one-line mistakes, and preemption: SIGUSR1 (``scancel --signal``) and SIGTERM (``scontrol requeue``) save
last.ckpt, the job is requeued and resumes on its own, with results byte-identical to an uninterrupted job."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from cluster_runs import assert_same_as_one_process, fit_args, helpers_env, one_process, read_results, results_in
from conftest import REPO
from slurm_cluster import free_ports

SBATCH = str(REPO / "scripts" / "slurm" / "fit.sbatch")
pytestmark = pytest.mark.xdist_group("slurm")  # one worker: the session's SLURM is started once, on it
WAIT = ["--trainer.callbacks+=signal_at.WaitAt", "--trainer.callbacks.marker", "at_step",
        "--trainer.callbacks.step", "6"]  # rank 0 waits at step 6 (after last.ckpt of step 4) for the signal


def job_env() -> dict[str, str]:
    """The environment of a test job. Its rendezvous port is a free one (``MASTER_PORT``, which Lightning honours):
    by default Lightning derives it from the job id (15000 + its last 4 digits), and this SLURM's job ids restart at
    1 in every session, so the port is a fixed number that a process of another test worker may hold."""
    return {"AMAX_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(free_ports(1)[0]),
            **helpers_env()}


def sbatch(slurm, cwd: Path, *args: str) -> str:
    """``sbatch scripts/slurm/fit.sbatch <fit options>`` as the README says; the job id."""
    cwd.mkdir(parents=True, exist_ok=True)
    return slurm.run("sbatch", "--parsable", SBATCH, *args, cwd=cwd, env=job_env()).stdout.strip()


def job_log(cwd: Path, job: str) -> str:
    return (cwd / f"amax-{job}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_gpt2_dir, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Per method, results.json and the log of an uninterrupted 2-process run, made on first use: continuous by the
    batch script of the README, token search by ``srun -n 2`` (which Lightning alone refuses)."""

    class Runs(dict):
        def __missing__(self, method: str) -> tuple[Path, str]:
            cwd = tmp_path_factory.mktemp(f"uninterrupted_{method}")
            if method == "continuous":
                job = sbatch(slurm, cwd, *fit_args(tiny_gpt2_dir, method))
                fields = slurm.wait_done(job)
                log = job_log(cwd, job)
                assert fields["JobState"] == "COMPLETED", log[-3000:]
            else:
                proc = slurm.run("srun", "-n", "2", sys.executable, "-m", "amax_lightning", "fit",
                                 *fit_args(tiny_gpt2_dir, method), cwd=cwd, env=job_env(), check=False, timeout=120)
                log = proc.stderr + proc.stdout  # as in a job log: the results path is the last line
                assert proc.returncode == 0, log[-3000:]
            self[method] = results_in(cwd), log
            return self[method]

    return Runs()


@pytest.mark.parametrize("method", ["continuous", "gcg", "epo"])
def test_batch_script_and_srun_n_2_equal_one_process(uninterrupted, tiny_gpt2_dir, tmp_path, method):
    path, log = uninterrupted[method]
    assert_same_as_one_process(read_results(path), one_process(tiny_gpt2_dir, method, tmp_path), method)
    assert "Traceback" not in log and "\r" not in log and "manual optimization" not in log  # a log a job can keep
    assert "steps: 100% 12/12" in log and log.strip().splitlines()[-1] == str(path)
    assert "SLURM auto-requeueing" not in log and not list(path.parent.parent.parent.rglob("hpc_ckpt_*.ckpt"))


def test_srun_n_2_with_wrong_devices_is_one_line(slurm, tiny_gpt2_dir, tmp_path):
    """``srun -n 2`` runs (above); a --trainer.devices that disagrees with it stops every task with one line naming the
    flag to use, exit 2."""
    proc = slurm.run("srun", "-n", "2", sys.executable, "-m", "amax_lightning", "fit",
                     *fit_args(tiny_gpt2_dir, "gcg", "--trainer.devices", "3"), check=False, cwd=tmp_path,
                     env=job_env())
    ours = {line for line in proc.stderr.splitlines() if not line.startswith("srun:")}
    assert ours == {"amax_lightning: error: --trainer.devices 3 does not match srun's 2 process(es) per node; "
                    "use --trainer.devices 2 (or leave it out)"}, proc.stderr[-2000:]
    assert proc.returncode == 2 and not list(tmp_path.rglob("lightning_logs"))


def signal_and_resume(slurm, cwd: Path, model: Path, method: str, send) -> str:
    """Submit the batch script, signal it at step 6 with ``send(job)``, start the requeued job 2 s later (SLURM
    itself delays a requeued job by about 2 minutes) and finish; the job's log."""
    job = sbatch(slurm, cwd, *fit_args(model, method, *WAIT))
    slurm.wait(job, lambda f: (cwd / "at_step").exists() or f.get("JobState") != "RUNNING" and
               f.get("JobState") != "PENDING", timeout=120)
    assert (cwd / "at_step").exists(), job_log(cwd, job)[-3000:]
    send(job)
    slurm.wait(job, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING", timeout=60)
    time.sleep(2)  # a job started in the second its credential was revoked (the requeue) is killed at once
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    fields = slurm.wait_done(job)
    log = job_log(cwd, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    return log


@pytest.mark.parametrize("method, how", [("continuous", "SIGUSR1"), ("gcg", "SIGTERM")])
def test_preempted_job_is_requeued_and_resumes_byte_identical(slurm, uninterrupted, tiny_gpt2_dir, tmp_path, method,
                                                               how):
    cwd = tmp_path / "job"
    if how == "SIGUSR1":  # SLURM's warning before the time limit (sbatch --signal=USR1@120 in the script)
        log = signal_and_resume(slurm, cwd, tiny_gpt2_dir, method,
                                lambda job: slurm.run("scancel", "--signal=USR1", job))
        assert "amax_lightning: SIGUSR1 after step 7 (saved " in log and ": requeued SLURM job" in log, log[-3000:]
    else:  # a requeue by SLURM (preemption, scontrol requeue): SIGTERM to every task, then SIGKILL
        log = signal_and_resume(slurm, cwd, tiny_gpt2_dir, method, lambda job: slurm.run("scontrol", "requeue", job))
        assert "interrupted at step 7: partial results" in log, log[-3000:]
    assert results_in(cwd).read_bytes() == uninterrupted[method][0].read_bytes()  # the same version_0, resumed in place
    assert not list(cwd.rglob("hpc_ckpt_*.ckpt"))
    assert "Traceback" not in log, log[-3000:]
    assert os.path.getsize(cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt") > 0
