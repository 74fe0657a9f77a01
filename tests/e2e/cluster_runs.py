"""Shared by the cluster tests (SLURM, torchrun): the fits they run, their one-process references (run once per
session), and the comparison of a run's results with a reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import REPO, TINY_TARGET, run_in_process, sweep_view

HELPERS = str(Path(__file__).parent)
STEPS, EVERY = 12, 4
METHODS = {  # continuous as a sweep (2 units x 3 seeds = 6 rows), token search as GCG and EPO (4 rows)
    "continuous": ["--model.target", "blocks.2.hook_resid_pre:3,5", "--seeds", "0-2"],
    "gcg": ["--model.target", TINY_TARGET, "--seeds", "0-3", "--model.method", "gcg", "--model.candidates", "8",
            "--model.top_k", "32"],
    "epo": ["--model.target", TINY_TARGET, "--seeds", "0-3", "--model.method", "epo", "--model.candidates", "8",
            "--model.top_k", "32", "--model.population", "2", "--model.restart_every", "5"],
}
EXACT = {"gcg", "epo"}
TOLERANCE = 1e-5  # relative, for floats computed in differently shaped chunks (README "Clusters")
_references: dict[str, dict] = {}


def fit_args(model: Path, method: str, *extra: str) -> list[str]:
    """``fit`` options of a cluster test run (after ``fit``): few steps, last.ckpt every 4 steps, 1 thread each."""
    return ["--model.model_name_or_path", str(model), *METHODS[method], "--trainer.max_steps", str(STEPS),
            "--checkpoint.every_n_train_steps", str(EVERY), "--results.null_samples", "100", "--threads", "1",
            "--trainer.accelerator", "cpu", *extra]


def helpers_env() -> dict[str, str]:
    """PYTHONPATH for subprocesses: the package and the test callbacks (``signal_at``)."""
    return {"PYTHONPATH": f"{REPO / 'src'}:{HELPERS}"}


def one_process(model: Path, method: str, folder: Path) -> dict:
    """results.json of the plain one-process run of ``method`` (run once per session, in this process)."""
    if method not in _references:
        proc = run_in_process(["fit", *fit_args(model, method)], cwd=folder / method)
        assert proc.returncode == 0, proc.stderr[-2000:]
        path = Path(proc.stdout.strip().splitlines()[-1])
        _references[method] = sweep_view(str(path), json.loads(path.read_text()))
    return _references[method]


def results_in(root: Path) -> Path:
    """The one results.json under ``root``, in the only version folder (no second one was made)."""
    (logs,) = root.rglob("lightning_logs")
    assert [p.name for p in logs.iterdir()] == ["version_0"], list(logs.iterdir())
    return logs / "version_0" / "results.json"


def without_chunks(results):
    """``results`` without its ``chunk_rows`` entries (rows per chunk: a process's share, by design)."""
    if isinstance(results, dict):
        return {k: without_chunks(v) for k, v in results.items() if k != "chunk_rows"}
    return [without_chunks(v) for v in results] if isinstance(results, list) else results


def assert_close(got, want, path: str = "") -> None:
    """Same structure, same strings and integers (tokens, counts), floats within ``TOLERANCE`` relative."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=TOLERANCE, abs_tol=1e-7), f"{path}: {got} vs {want}"
    else:
        assert got == want, f"{path}: {got!r} vs {want!r}"


def read_results(path: Path) -> dict:
    """A results.json, with a sweep's tables read back (``conftest.sweep_view``)."""
    return sweep_view(str(path), json.loads(Path(path).read_text()))


def assert_same_as_one_process(results: dict, reference: dict, method: str) -> None:
    """Equal to the one-process run apart from ``chunk_rows``: token search exactly (its scores are the same
    numbers in any chunk; the snapshots' mean objective, the step's own score, to ``TOLERANCE``), continuous to
    ``TOLERANCE`` (chunk shapes round differently), tokens and counts exactly.
    Sweeps (continuous here) are compared unit by unit, from their tables (``read_results``)."""
    if method in EXACT:  # the snapshots' mean objective is the step's own score: chunk shapes round it differently
        got, want = without_chunks(results), without_chunks(reference)
        assert_close(got.pop("convergence"), want.pop("convergence"), "convergence")
        assert got == want, [(k, got.get(k), want.get(k)) for k in want if got.get(k) != want.get(k)]
    else:
        assert_close(without_chunks(results), without_chunks(reference))
