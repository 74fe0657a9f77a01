"""Time to result: what a user waits for, start to printed path, phase by phase, against the steps alone.

Random-init GPT-2 small (with the real tokenizer) written to a temp folder; the command is the study's,
``python -m amax_lightning fit --config configs/reproduce.yaml`` on that folder, run as a subprocess twice: a first
run with an empty null-model cache, then a second with the same model (the cache warm). A clock callback
(``--trainer.callbacks+=time_to_result.PhaseClock``) stamps when the steps start and end; the parent stamps the
start, the printed path (the last line of stdout) and the exit. Imports are timed alone in fresh interpreters (the
stack, and ``amax_lightning.cli``), and the null model cold and warm in this process. Medians of ``--repeats``.

    python benchmarks/time_to_result.py [--steps 500] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


class PhaseClock(Callback):
    """Prints wall-clock stamps at the start and end of the optimization steps (stderr, ``PHASE name time``)."""

    def on_train_start(self, trainer, module) -> None:
        print(f"PHASE steps_start {time.time():.6f}", file=sys.stderr, flush=True)

    def on_train_end(self, trainer, module) -> None:  # user callbacks run before the ResultsWriter's analysis
        print(f"PHASE steps_end {time.time():.6f}", file=sys.stderr, flush=True)


def write_gpt2_small(root: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(0)
    folder = root / "gpt2-random"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    GPT2Tokenizer.from_pretrained(REPO / "tests" / "fixtures" / "gpt2_tokenizer").save_pretrained(folder)
    return folder


def run_once(model: Path, cwd: Path, cache: Path, steps: int) -> dict:
    """One CLI run; seconds for: until the steps start (imports, parsing, model load, setup), the steps, after them
    until the path is printed (analysis, report, TensorBoard), start to printed path, and start to exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AMAX_LIGHTNING_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks")])}
    command = [sys.executable, "-m", "amax_lightning", "fit", "--config", str(REPO / "configs" / "reproduce.yaml"),
               "--model.model_name_or_path", str(model), "--trainer.max_steps", str(steps),
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=time_to_result.PhaseClock"]
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as stderr:
        started = time.time()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        printed = None
        for line in proc.stdout:  # the path is the last line of stdout
            if line.strip().endswith("results.json"):
                printed = time.time()
        ended = time.time() if proc.wait() is not None else None
        stderr.seek(0)
        err = stderr.read()
    if proc.returncode != 0 or printed is None:
        raise SystemExit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    stamps = {line.split()[1]: float(line.split()[2]) for line in err.splitlines() if line.startswith("PHASE ")}
    return {"to_path": printed - started, "before_steps": stamps["steps_start"] - started,
            "steps": stamps["steps_end"] - stamps["steps_start"], "after_steps": printed - stamps["steps_end"],
            "exit": ended - printed, "total": ended - started}


def import_seconds(modules: str, gc_off: bool) -> float:
    """Seconds for a fresh interpreter to import ``modules``, with the collector off (as the command runs) or on."""
    code = ("import gc; gc.disable(); " if gc_off else "") + f"import {modules}"
    started = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return time.time() - started


def end_of_fit_pieces(model: Path, cache: Path) -> dict:
    """In this process: the model load, the null model cold and warm."""
    from amax_lightning.backbone import load_backbone
    from amax_lightning.null_model import cached_null_token_distribution

    started = time.time()
    backbone = load_backbone(str(model))
    pieces = {"model load (in process)": time.time() - started}
    vocab, scale = backbone.vocab_embeddings.detach(), backbone.embedding_std
    for label in ("null model, cold cache", "null model, warm cache"):
        started = time.time()
        cached_null_token_distribution(vocab, 20_000, scale=scale, folder=str(cache / "pieces"))
        pieces[label] = time.time() - started
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_gpt2_small(root)
        imports = {(modules, gc_off): statistics.median(import_seconds(modules, gc_off) for _ in range(3))
                   for modules in ("torch", "torch, transformers, lightning.pytorch", "amax_lightning.cli")
                   for gc_off in (False, True)}
        first, second = [], []
        for repeat in range(args.repeats):
            cache = root / f"cache{repeat}"
            first.append(run_once(model, root / f"first{repeat}", cache, args.steps))
            second.append(run_once(model, root / f"second{repeat}", cache, args.steps))
        pieces = end_of_fit_pieces(model, root)
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    print(f"time to result, GPT-2 small shape (random weights), {args.steps} steps, 10 seeds; medians of "
          f"{args.repeats}; seconds\n")
    print("| phase | first run (cold cache) | second run (same model) |\n|---|---:|---:|")
    for key, label in (("before_steps", "imports, parsing, model load, setup"), ("steps", "optimization steps"),
                       ("after_steps", "analysis, report, TensorBoard, until the path is printed"),
                       ("to_path", "**start to printed path**"), ("exit", "printed path to exit"),
                       ("total", "start to exit")):
        print(f"| {label} | {median(first, key):.1f} | {median(second, key):.1f} |")
    for runs, name in ((first, "first"), (second, "second")):
        print(f"\n{name} run: printed path / steps = {median(runs, 'to_path') / median(runs, 'steps'):.2f}x, "
              f"printed path - steps = {median(runs, 'to_path') - median(runs, 'steps'):.1f} s "
              f"(to exit: {median(runs, 'total') / median(runs, 'steps'):.2f}x, "
              f"{median(runs, 'total') - median(runs, 'steps'):.1f} s)")
    print("\nimports alone in a fresh interpreter (median of 3), collector on / off (the command runs with it off):")
    for (modules, gc_off), seconds in imports.items():
        if gc_off:
            print(f"  import {modules}: {imports[modules, False]:.2f} / {seconds:.2f} s")
    for label, seconds in pieces.items():
        print(f"{label}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
