"""``python -m amax_lightning sensitivity --config configs/sensitivity.yaml``: the sensitivity study, end to end.

The config names a fit config (optional), the targets, the seeds, the perturbation ``sizes`` (relative to each
initial vector's norm), ``replicas`` per seed and size, ``snapshots`` (steps at which tokens are decoded; the last
is the perturbed run's step budget) and the ``numerics`` variants (Lightning precisions) run for the first
snapshot's steps, plus ``alone`` (each seed in its own run, fp32). Per target: one perturbed fit (all seeds x sizes x
replicas in one batch, ``sensitivity.SensitivityRecorder``), then one fit per numerics variant. Extra command-line
arguments go to every fit (e.g. ``--model.model_name_or_path ./my-gpt2 --trainer.accelerator gpu``). Rank 0 writes
``sensitivity/version_N``: sensitivity.json, .csv, .md (with the verdict) and the plots, also to TensorBoard.
"""

from __future__ import annotations

import json
import os

from amax_lightning.analysis.sensitivity import NUMERICS, REPLICAS, SIZES, SNAPSHOTS
from amax_lightning.base.checks import PRECISIONS, check_choice
from amax_lightning.base.errors import UserError
from amax_lightning.base.seeds import parse_seeds
from amax_lightning.commands.study import read_config
from amax_lightning.lightning.callbacks import ResultsWriter, find_callback
from amax_lightning.lightning.cli import run_trainer
from amax_lightning.lightning.runs import claim_version_folder
from amax_lightning.lightning.sensitivity_recorder import SensitivityRecorder
from amax_lightning.report.sensitivity import write_summary

KEYS = ("fit_config", "targets", "seeds", "sizes", "replicas", "snapshots", "numerics", "alone")
RESERVED = {"--model.target": "targets", "--seeds": "seeds", "--seed": "seeds", "--trainer.max_steps": "snapshots",
            "--model.perturb_sizes": "sizes", "--model.replicas": "replicas", "--trainer.precision": "numerics"}


def load_sensitivity(path: str) -> dict:
    """Read and check a sensitivity config; defaults for what it leaves out (``sensitivity.SIZES`` etc.)."""
    config = read_config(path, "sensitivity", KEYS, "targets")
    sizes = config.get("sizes", list(SIZES))
    if not isinstance(sizes, list) or not sizes or not all(isinstance(s, (int, float)) and 0 <= s <= 10 for s in sizes):
        raise UserError(f"sensitivity config {path!r}: sizes must be a list of numbers in [0, 10], e.g. [0, 1e-7, 1e-3]")
    snapshots = config.get("snapshots", list(SNAPSHOTS))
    if not isinstance(snapshots, list) or not snapshots or not all(isinstance(s, int) and s >= 1 for s in snapshots):
        raise UserError(f"sensitivity config {path!r}: snapshots must be a list of steps >= 1, e.g. [500, 1000]")
    replicas = config.get("replicas", REPLICAS)
    if not isinstance(replicas, int) or replicas < 2:
        raise UserError(f"sensitivity config {path!r}: replicas {replicas!r} must be an integer >= 2")
    numerics = config.get("numerics", list(NUMERICS))
    if not isinstance(numerics, list):
        raise UserError(f"sensitivity config {path!r}: numerics must be a list of precisions, e.g. [64-true, 32-true]")
    for precision in numerics:
        check_choice("numerics", str(precision), PRECISIONS)
    if not isinstance(config.get("alone", True), bool):
        raise UserError(f"sensitivity config {path!r}: alone must be true or false")
    seeds = parse_seeds(config.get("seeds", "0-9"))
    return {"fit_config": config["fit_config"], "targets": config["targets"], "seeds": seeds, "sizes": [float(s) for s in sizes],
            "replicas": replicas, "snapshots": sorted(set(snapshots)), "numerics": [str(p) for p in numerics],
            "alone": bool(config.get("alone", True))}


def run_sensitivity(args: list[str]) -> str | None:
    """Run the sensitivity study of ``--config``; return the path of sensitivity.md (None on ranks other than 0)."""
    if len(args) < 2 or args[0] != "--config":
        raise UserError("sensitivity needs --config <sensitivity.yaml> first, e.g. sensitivity --config "
                        "configs/sensitivity.yaml")
    config, extra = load_sensitivity(args[1]), args[2:]
    for arg in extra:
        key = arg.split("=")[0]
        if key == "--ckpt_path":
            raise UserError("--ckpt_path cannot be passed to sensitivity: it runs several fits; rerun the study, or "
                            "resume its perturbed fit with fit --model.perturb_sizes ... --ckpt_path")
        if key in RESERVED:
            raise UserError(f"{key} cannot be passed to sensitivity; set {RESERVED[key]} in the sensitivity config")
    base = ["fit"] + (["--config", config["fit_config"]] if config["fit_config"] else [])
    seeds = ",".join(str(s) for s in config["seeds"])
    summaries, rank_zero = [], True
    for target in config["targets"]:
        trainer = run_trainer([
            *base, "--model.target", target, "--seeds", seeds, "--model.perturb_sizes", json.dumps(config["sizes"]),
            "--model.replicas", str(config["replicas"]), "--trainer.max_steps", str(config["snapshots"][-1]),
            "--trainer.callbacks+=amax_lightning.lightning.sensitivity_recorder.SensitivityRecorder",
            "--trainer.callbacks.snapshots", json.dumps(config["snapshots"]), *extra])
        recorder = find_callback(trainer, SensitivityRecorder)
        rank_zero = trainer.is_global_zero
        summary = dict(recorder.summary or {})
        summary.update(numerics_comparison(base, target, config, extra, trainer.world_size))
        summaries.append(summary)
    if not rank_zero:
        return None
    folder = os.path.join("sensitivity", f"version_{claim_version_folder('sensitivity')}")
    path = write_summary(folder, {"targets": summaries})
    for summary in summaries:
        print(f"{summary['target']}: {summary['verdict']['text']}", flush=True)
    print(path, flush=True)
    return path


def numerics_comparison(base: list[str], target: str, config: dict, extra: list[str], world_size: int) -> dict:
    """The seeds without perturbation under each numerics variant (and alone, fp32), for the first snapshot's steps:
    per variant the share of positions whose token equals the reference's (fp64 when run, else the first variant)
    and the largest absolute difference of a seed's final objective."""
    steps = config["snapshots"][0]
    variants = [(precision, config["seeds"]) for precision in config["numerics"]]
    note = None
    if config["alone"] and world_size == 1:
        variants += [("32-true alone", [seed]) for seed in config["seeds"]]
    elif config["alone"]:
        note = f"alone runs skipped: one seed cannot be split over {world_size} processes"
    runs: dict[str, dict[int, tuple[list[int], float]]] = {}
    for variant, seeds in variants:
        precision = variant.split()[0]
        writer = find_callback(run_trainer([
            *base, "--model.target", target, "--seeds", ",".join(map(str, seeds)), "--trainer.precision", precision,
            "--trainer.max_steps", str(steps), "--results.null_samples", "0", *extra]), ResultsWriter)
        if writer is not None and writer.results is not None:
            runs.setdefault(variant if variant.endswith("alone") else precision, {}).update(
                {run.seed: (run.token_ids, run.final_activation) for run in writer.results.runs})
    if not runs:
        return {"numerics_variants": [], "numerics_note": note}
    reference = "64-true" if "64-true" in runs else next(iter(runs))
    rows = []
    for variant, seeded in runs.items():
        matches = [a == b for seed, (ids, _) in seeded.items() for a, b in zip(ids, runs[reference][seed][0])]
        gaps = [abs(value - runs[reference][seed][1]) for seed, (_, value) in seeded.items()]
        rows.append({"variant": variant, "token_agreement": sum(matches) / len(matches),
                     "max_abs_objective_difference": max(gaps)})
    return {"numerics_steps": steps, "numerics_reference": reference, "numerics_variants": rows,
            "numerics_note": note}
