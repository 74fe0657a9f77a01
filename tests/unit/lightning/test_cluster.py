"""cluster.py without a cluster: what srun / torchrun variables mean for the Trainer, and the one-line messages."""

from __future__ import annotations

import pytest

from amax_lightning.base.errors import UserError
from amax_lightning.lightning.cluster import (
    Launch,
    detect_launch,
    is_lost_peer,
    lost_peer_message,
    matching_trainer,
    requeued,
)

SRUN_N2 = {"SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NAME": "amax"}


def test_srun_n_gets_the_tasks_per_node_lightning_needs():
    env = dict(SRUN_N2)
    assert detect_launch(env) == Launch("srun", 2, 1, 2)
    assert env["SLURM_NTASKS_PER_NODE"] == "2"
    env = {**SRUN_N2, "SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NNODES": "3"}
    assert detect_launch(env) == Launch("srun", 6, 3, 2)


def test_uneven_tasks_and_python_in_the_batch_script_are_one_line():
    with pytest.raises(UserError, match=r"SLURM_TASKS_PER_NODE=2,1\); use srun -N <nodes> --ntasks-per-node"):
        detect_launch({**SRUN_N2, "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NNODES": "2"})
    batch = {k: v for k, v in SRUN_N2.items() if k != "SLURM_STEP_ID"}
    with pytest.raises(UserError, match="python runs once, in the batch script; start it with srun"):
        detect_launch(batch)
    assert detect_launch({**batch, "SLURM_NTASKS": "1"}) == Launch("sbatch", 1, 1, 1)
    assert detect_launch({**SRUN_N2, "SLURM_JOB_NAME": "interactive"}) is None  # Lightning's own opt-out


def test_torchrun_wins_over_slurm_variables():
    env = {**SRUN_N2, "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert detect_launch(env) == Launch("torchrun", 4, 2, 2)


def test_trainer_flags_follow_the_launcher_or_fail_naming_the_flag():
    launch = Launch("torchrun", 4, 2, 2)
    assert matching_trainer(launch, "auto", 1) == {"devices": 2, "num_nodes": 2}
    assert matching_trainer(launch, 2, 2) == {"devices": 2, "num_nodes": 2}
    with pytest.raises(UserError, match=r"^--trainer.devices 3 does not match torchrun's 2 process\(es\) per node; "
                                        r"use --trainer.devices 2"):
        matching_trainer(launch, 3, 2)
    with pytest.raises(UserError, match=r"^--trainer.num_nodes 4 does not match torchrun's 2 node\(s\); "
                                        r"use --trainer.num_nodes 2"):
        matching_trainer(launch, "auto", 4)
    with pytest.raises(UserError, match="needs a launcher"):
        matching_trainer(None, "auto", 2, env={})
    assert matching_trainer(None, "auto", 2, env={"NODE_RANK": "1", "MASTER_ADDR": "node0"}) == {}  # Lightning's way
    assert matching_trainer(None, 2, 1) == {}


def test_requeued_and_lost_peer_messages():
    assert requeued({"SLURM_RESTART_COUNT": "1"}) and not requeued({"SLURM_RESTART_COUNT": "0"}) and not requeued({})
    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:2345. This is "
                          "typically caused by a remote worker crashing.\nmore")
    assert is_lost_peer(closed) and not is_lost_peer(ValueError("Connection closed by peer"))
    assert lost_peer_message(closed, 1, 2, 37, 25, 600) == (
        "amax_lightning: error: rank 1 of 2 lost rank 0 at step 37: it exited (Connection closed by peer "
        "[10.0.0.2]:2345); last.ckpt of step 25 is intact: resume with --ckpt_path last (any number of processes)")
    hung = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation")
    assert lost_peer_message(hung, 0, 4, 3, None, 5) == (
        "amax_lightning: error: rank 0 of 4 lost another process at step 3: it stopped answering for 5 s "
        "(--collective_timeout) (Timed out waiting 5000ms for recv operation); no checkpoint was saved yet")
