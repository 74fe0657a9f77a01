"""Clusters: what ``srun`` or ``torchrun`` started, the Trainer settings that match it (one-line errors when they do
not), the collective timeout, SLURM requeue, and one line for a lost process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

from lightning.pytorch.utilities.exceptions import SIGTERMException

from amax_lightning.base.errors import UserError, first_line

DEFAULT_COLLECTIVE_TIMEOUT = 600  # seconds: a peer that stops answering is noticed within 10 minutes
MAX_COLLECTIVE_TIMEOUT = 7 * 24 * 3600


@dataclass(frozen=True)
class Launch:
    """The processes an external launcher started: ``srun`` or ``torchrun``."""

    launcher: str
    world_size: int
    nodes: int
    per_node: int


def _per_node_of_srun(env) -> int:
    """Tasks per node under srun; fills ``SLURM_NTASKS_PER_NODE`` (which Lightning requires) after ``srun -n N``."""
    ntasks = int(env["SLURM_NTASKS"])
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"])
    groups = env.get("SLURM_TASKS_PER_NODE", str(ntasks)).split(",")  # e.g. "2", "2(x3)", "3,2(x2)"
    counts = {int(re.match(r"\d+", group).group()) for group in groups}
    if len(counts) != 1:
        raise UserError(f"srun placed different numbers of tasks on the nodes (SLURM_TASKS_PER_NODE="
                        f"{env.get('SLURM_TASKS_PER_NODE')}); use srun -N <nodes> --ntasks-per-node <tasks>")
    per_node = counts.pop()
    env["SLURM_NTASKS_PER_NODE"] = str(per_node)  # what `srun -n N` leaves out and Lightning needs
    return per_node


def detect_launch(env=None) -> Launch | None:
    """The launcher that started this process, or None for a plain ``python -m amax_lightning``.

    torchrun wins over SLURM's variables (torchrun inside an sbatch script). After ``srun -n N``, sets the
    ``SLURM_NTASKS_PER_NODE`` that Lightning's SLURM support requires, or raises a UserError naming the flag.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        if world % per_node:
            raise UserError(f"torchrun started {world} processes, not a multiple of the {per_node} on this node; "
                            "use the same --nproc-per-node on every node")
        return Launch("torchrun", world, world // per_node, per_node)
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # Lightning's rule
        return None
    if "SLURM_STEP_ID" not in env:  # the batch script itself: one process, however many tasks the job asked for
        if int(env["SLURM_NTASKS"]) > 1:
            raise UserError(f"this SLURM job has {env['SLURM_NTASKS']} tasks but python runs once, in the batch "
                            "script; start it with srun (scripts/slurm/fit.sbatch)")
        return Launch("sbatch", 1, 1, 1)
    per_node = _per_node_of_srun(env)
    return Launch("srun", int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1")), per_node)


def count_devices(devices) -> int | None:
    """The number of processes per node that Lightning's ``devices`` asks for; None for ``auto`` / ``-1``."""
    if devices in (None, "auto", -1, "-1"):
        return None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.lstrip("-").isdigit() else None


def matching_trainer(launch: Launch | None, devices, num_nodes, env=None) -> dict:
    """The Trainer's ``devices`` and ``num_nodes`` for ``launch``: left-out values (``auto``, 1 node) are taken from
    the launcher; given ones that disagree with it raise a one-line UserError naming the flag to use. Without a
    launcher, several nodes need Lightning's own variables (``NODE_RANK``, ``MASTER_ADDR``) on every node."""
    env = os.environ if env is None else env
    count = count_devices(devices)
    nodes = 1 if num_nodes is None else int(num_nodes)
    if launch is None:
        if nodes > 1 and not ("NODE_RANK" in env and "MASTER_ADDR" in env):
            raise UserError(f"--trainer.num_nodes {nodes} needs a launcher that starts the processes of every node "
                            "(srun or torchrun; README 'Clusters') or NODE_RANK and MASTER_ADDR set on each; "
                            "on one machine, leave it out")
        return {}
    name = launch.launcher
    if count is not None and count != launch.per_node:
        raise UserError(f"--trainer.devices {devices} does not match {name}'s {launch.per_node} process(es) per node; "
                        f"use --trainer.devices {launch.per_node} (or leave it out)")
    if nodes != launch.nodes and nodes != 1:
        raise UserError(f"--trainer.num_nodes {nodes} does not match {name}'s {launch.nodes} node(s); "
                        f"use --trainer.num_nodes {launch.nodes} (or leave it out)")
    return {"devices": devices if count is not None else launch.per_node, "num_nodes": launch.nodes}


def cluster_environment(launch: Launch | None):
    """Lightning's environment for ``launch``, SLURM's without its own requeue handler (``DeferInterrupts`` and
    ``requeue`` do that, through last.ckpt); None: let Lightning detect it."""
    if launch is None:
        return None
    if launch.launcher == "torchrun":
        from lightning.fabric.plugins.environments import TorchElasticEnvironment  # not SLURM's, inside an sbatch

        return TorchElasticEnvironment()
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=False)


def ddp_strategy(timeout_s: int, environment):
    """Lightning's DDP strategy with collectives that give up after ``timeout_s`` seconds (gloo and NCCL wait 30
    minutes by default, billed on every node, for a peer that stopped answering)."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=timeout_s), cluster_environment=environment)


# --- requeue ------------------------------------------------------------------------------------------------------
class Requeue(SIGTERMException):
    """SIGUSR1 (SLURM's warning before a time limit, ``sbatch --signal``): save last.ckpt, requeue the job, stop."""

    def __init__(self) -> None:
        super().__init__("SIGUSR1: requeue")


def slurm_job_id(env=None) -> str | None:
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue(step: int, checkpoint: str | None) -> None:
    """Rank 0, once every process has saved: ``scontrol requeue`` this SLURM job (SLURM then stops every task; the
    requeued job resumes ``checkpoint``), or outside SLURM say how to resume. One line on stderr either way."""
    saved = f"saved {checkpoint}" if checkpoint else "nothing saved yet"
    job = slurm_job_id()
    if job is None:
        print(f"amax_lightning: SIGUSR1 after step {step}: stopped ({saved}); resume with --ckpt_path last",
              file=sys.stderr, flush=True)
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode == 0:
        print(f"amax_lightning: SIGUSR1 after step {step} ({saved}): requeued SLURM job {job}, which resumes from "
              "there", file=sys.stderr, flush=True)
    else:
        print(f"amax_lightning: SIGUSR1 after step {step} ({saved}): scontrol requeue {job} failed "
              f"({done.stderr.strip()[:200]}); submit the job again with --ckpt_path last", file=sys.stderr, flush=True)


def requeued(env=None) -> bool:
    """Whether this is a requeued SLURM job (``SLURM_RESTART_COUNT`` >= 1): it resumes its last.ckpt on its own."""
    env = os.environ if env is None else env
    return env.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


# --- a lost process -----------------------------------------------------------------------------------------------
def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed because another process exited or stopped answering."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                      "ProcessGroupGloo", "NCCL", "gloo"))


def lost_peer_message(exc: BaseException, rank: int, world_size: int, step: int, saved_step: int | None,
                      timeout_s: int | None) -> str:
    """One line: which process was lost (the other one, with two), how, at which step, and what is on disk."""
    text = first_line(exc)
    hung = "timed out" in text.lower() or "timeout" in text.lower()
    who = f"rank {1 - rank}" if world_size == 2 else "another process"
    how = f"stopped answering for {timeout_s} s (--collective_timeout)" if hung else "exited"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")[:160]  # gloo: "[file:line] What."
    saved = (f"last.ckpt of step {saved_step} is intact: resume with --ckpt_path last (any number of processes)"
             if saved_step else "no checkpoint was saved yet")
    return (f"amax_lightning: error: rank {rank} of {world_size} lost {who} at step {step}: it {how} ({detail}); "
            f"{saved}")
