"""Two nodes simulated on localhost with the README's torchrun lines (``--nnodes 2``, one process each, gloo): the
results equal one process's; a node lost mid-run (its worker SIGKILLed, or SIGSTOPped as in a network partition)
stops the survivor with one line naming the rank and the step, last.ckpt intact; that checkpoint resumes on one
process to the results of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cluster_runs import assert_same_as_one_process, fit_args, helpers_env, one_process, read_results, results_in
from conftest import run_cli

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(cwd: Path, args: list[str]) -> list[subprocess.Popen]:
    """The README's lines, one per node: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr ...
    --master-port ... -m amax_lightning fit ...``, both on this host."""
    cwd.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **helpers_env()}
    return [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                              "--master-addr", "127.0.0.1", "--master-port", port, "-m", "amax_lightning", "fit",
                              *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts each worker in a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's workers (also a stopped one) and its torchrun agent, and collect it."""
    for pid in [*children(node.pid), node.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    node.communicate()


def finish(node: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_node(node)
        raise
    return node.returncode, out, err


def test_two_node_torchrun_equals_one_process(tiny_gpt2_dir, tmp_path):
    nodes = torchrun_nodes(tmp_path / "run", fit_args(tiny_gpt2_dir, "continuous"))
    (code0, out0, err0), (code1, out1, err1) = finish(nodes[0]), finish(nodes[1])
    assert code0 == code1 == 0, err0[-2000:] + err1[-2000:]
    path = results_in(tmp_path / "run")
    assert out0.strip().splitlines()[-1] == str(path) and str(path) not in out1  # only rank 0 writes and reports
    assert_same_as_one_process(read_results(path),
                               one_process(tiny_gpt2_dir, "continuous", tmp_path), "continuous")


def lose_node_1(tiny_gpt2_dir, cwd: Path, how: str, *extra: str) -> tuple[str, float]:
    """Run the two nodes; node 1's worker sends itself ``how`` at the start of step 6 (after last.ckpt of step 4).
    Node 0's worker must stop on its own: its stderr, and seconds from start to its exit."""
    args = fit_args(tiny_gpt2_dir, "continuous", "--trainer.callbacks+=signal_at.SignalAt",
                    "--trainer.callbacks.signal", how, "--trainer.callbacks.step", "6",
                    "--trainer.callbacks.rank", "1", *extra)
    started = time.monotonic()
    nodes = torchrun_nodes(cwd, args)
    try:
        code, _, err = finish(nodes[0])
        elapsed = time.monotonic() - started
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)  # node 1's agent and its stopped worker
    assert code != 0
    return err, elapsed


def worker_lines(err: str) -> list[str]:
    """Node 0's worker's own lines but its memory plan (printed before the first step): what torchrun's agent adds
    after the worker exits is left out."""
    return [line for line in err.splitlines()
            if line.startswith("amax_lightning:") and not line.startswith("amax_lightning: memory per process")]


def test_a_killed_node_stops_the_survivor_in_one_line_and_its_checkpoint_resumes_on_one_process(tiny_gpt2_dir,
                                                                                               tmp_path):
    cwd = tmp_path / "run"
    err, elapsed = lose_node_1(tiny_gpt2_dir, cwd, "SIGKILL")
    (line,) = worker_lines(err)
    assert re.fullmatch(r"amax_lightning: error: rank 0 of 2 lost rank 1 at step 6: it exited \([^;]*\); last\.ckpt "
                        r"of step 4 is intact: resume with --ckpt_path last \(any number of processes\)", line), err
    assert "peer" in line or "Connection" in line  # gloo's words for a closed connection
    assert "[rank0]: Traceback" not in err and "results.json" not in err
    print(f"survivor of a SIGKILLed node exited {elapsed:.1f} s after the start")
    proc = run_cli(["fit", *fit_args(tiny_gpt2_dir, "continuous", "--ckpt_path", "last")], cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_as_one_process(read_results(results_in(cwd)),
                               one_process(tiny_gpt2_dir, "continuous", tmp_path), "continuous")


def test_a_hung_node_is_noticed_within_the_collective_timeout(tiny_gpt2_dir, tmp_path):
    err, elapsed = lose_node_1(tiny_gpt2_dir, tmp_path / "run", "SIGSTOP", "--collective_timeout", "5")
    (line,) = worker_lines(err)
    assert line.startswith("amax_lightning: error: rank 0 of 2 lost rank 1 at step 6: it stopped answering for 5 s "
                           "(--collective_timeout)"), err[-3000:]
    assert line.endswith("last.ckpt of step 4 is intact: resume with --ckpt_path last (any number of processes)")
    print(f"survivor of a SIGSTOPped node exited {elapsed:.1f} s after the start")
