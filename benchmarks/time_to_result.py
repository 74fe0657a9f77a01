"""Time to result: what a user waits for, start to printed path, phase by phase, against the steps alone.

Random-init GPT-2 small (with the real tokenizer) written to a temp folder; the command is the study's,
``python -m amax_lightning fit --config configs/reproduce.yaml`` on that folder, run as a subprocess twice: a first
run with an empty null-model cache, then a second with the same model (the cache warm). A clock callback
(``--trainer.callbacks+=time_to_result.PhaseClock``) stamps when the steps start and end; the parent stamps the
start, the printed path (the last line of stdout) and the exit. Imports are timed alone in fresh interpreters (the
stack, and ``amax_lightning.lightning.cli``), and the null model cold and warm in this process. Medians of ``--repeats``.

``--decode auto,fp32`` runs the pairs of runs once per decode path (``$AMAX_LIGHTNING_DECODE``), alternating, so the
ratios are measured side by side; ``fp32`` is what a CPU without bf16 kernels runs. The CPU's kind comes first
(name, PyTorch's capability string, AVX-512 BF16, AMX, oneDNN bf16 kernels) with the path ``auto`` chose and the
seconds per block it timed. ``--pool-table`` adds the null model's standard errors against the number of
directions (the numbers behind ``null_model.EXPECTED_SE`` and ``P_VALUE_SE``).

``--snapshots`` measures only the snapshots' cost (issue 27): the default snapshots against one at the last step.

    python benchmarks/time_to_result.py [--steps 500] [--repeats 1] [--decode auto,fp32] [--pool-table] [--snapshots]
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


def run_once(model: Path, cwd: Path, cache: Path, steps: int, decode: str, extra: tuple[str, ...] = ()) -> dict:
    """One CLI run; seconds for: until the steps start (imports, parsing, model load, setup), the steps, after them
    until the path is printed (analysis, report, TensorBoard), start to printed path, and start to exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AMAX_LIGHTNING_CACHE": str(cache), "AMAX_LIGHTNING_DECODE": decode,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks")])}
    command = [sys.executable, "-m", "amax_lightning", "fit", "--config", str(REPO / "configs" / "reproduce.yaml"),
               "--model.model_name_or_path", str(model), "--trainer.max_steps", str(steps),
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=time_to_result.PhaseClock", *extra]
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


def snapshot_overhead(model: Path, root: Path, steps: int, repeats: int) -> None:
    """The snapshots' cost (issue 27): the study with its default snapshots (about 20) against one snapshot at the
    last step (``--results.snapshot_every`` = steps: the steps alone), alternating, the null-model cache warm."""
    cache = root / "cache-snapshots"
    run_once(model, root / "prime", cache, steps, "auto")
    runs = {"default": [], "once": []}
    for repeat in range(repeats):
        for name, extra in (("default", ()), ("once", ("--results.snapshot_every", str(steps)))):
            runs[name].append(run_once(model, root / f"snap{repeat}{name}", cache, steps, "auto", extra))
    median = lambda name, key: statistics.median(run[key] for run in runs[name])  # noqa: E731
    print(f"\nsnapshots, {steps} steps, medians of {repeats} (alternating, warm cache):")
    print("| snapshots | optimization steps | start to printed path |\n|---|---:|---:|")
    for name, label in (("default", f"default (every {max(1, steps // 20)} steps)"), ("once", "one, at the last step")):
        print(f"| {label} | {median(name, 'steps'):.1f} s | {median(name, 'to_path'):.1f} s |")
    print(f"steps with snapshots / steps alone = {median('default', 'steps') / median('once', 'steps'):.3f}x; "
          f"time to result / steps alone = {median('default', 'to_path') / median('once', 'steps'):.3f}x "
          f"(without snapshots: {median('once', 'to_path') / median('once', 'steps'):.3f}x)")


def import_seconds(modules: str, gc_off: bool) -> float:
    """Seconds for a fresh interpreter to import ``modules``, with the collector off (as the command runs) or on."""
    code = ("import gc; gc.disable(); " if gc_off else "") + f"import {modules}"
    started = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return time.time() - started


def end_of_fit_pieces(model: Path, cache: Path, decode: str) -> dict:
    """In this process: the model load, the null model cold and warm (the study's 50 vectors)."""
    from amax_lightning.analysis.null_model import sampled_null
    from amax_lightning.model.backbone import load_backbone

    started = time.time()
    backbone = load_backbone(str(model))
    pieces = {"model load (in process)": time.time() - started}
    vocab, scale = backbone.vocab_embeddings.detach(), backbone.embedding_std
    for label in ("null model, cold cache", "null model, warm cache"):
        started = time.time()
        pool = sampled_null(vocab, 50, scale=scale, folder=str(cache / f"pieces-{decode}"), path=decode)
        pieces[label] = time.time() - started
    pieces["null model directions"] = pool.n_samples
    return pieces


def cpu_kind(model: Path, cache: Path) -> str:
    """The device's kind and the decode path ``auto`` picks on it (timing both where PyTorch has bf16 kernels)."""
    import json

    from amax_lightning.analysis.null_model import sampled_null
    from amax_lightning.model.backbone import load_backbone
    from amax_lightning.model.decode import device_kind

    kind = device_kind("cpu")
    vocab = load_backbone(str(model)).vocab_embeddings.detach()
    folder = cache / "kind"
    sampled_null(vocab, 50, max_samples=2048, folder=str(folder), path="auto")
    verdicts = [json.loads(path.read_text()) for path in folder.glob("decode-*.json")]
    chosen = (f"{verdicts[0]['path']} (timed: fp32 {verdicts[0]['fp32_seconds_per_block']:.3f} s, bf16 "
              f"{verdicts[0]['bf16_seconds_per_block']:.3f} s per 256-direction block)") if verdicts else \
        "fp32 (no bf16 kernels: not timed)"
    yes = {True: "yes", False: "no", None: "unknown"}
    return (f"CPU: {kind['name']}, capability {kind['capability']}, AVX-512 BF16 {yes[kind['avx512_bf16']]}, "
            f"AMX (bf16 matrix units) {yes[kind['amx']]}, oneDNN bf16 kernels {yes[kind['native_bf16_matmul']]}, "
            f"{kind['threads']} threads, torch {kind['torch']}; decode path chosen by auto: {chosen}")


def pool_table(model: Path, sizes=(2048, 3072, 4096, 5120, 10240, 20480)) -> None:
    """Standard errors of the null model's estimates for the study's 50 vectors against the pool's size."""
    from amax_lightning.analysis.null_model import pool_estimates
    from amax_lightning.analysis.null_pool import null_token_ids
    from amax_lightning.model.backbone import load_backbone

    backbone = load_backbone(str(model))
    started = time.time()
    ids = null_token_ids(backbone.vocab_embeddings.detach(), 0, max(sizes), backbone.embedding_std)
    seconds = time.time() - started
    print(f"\nnull model for 50 vectors against its directions ({max(sizes)} decoded in {seconds:.1f} s, "
          f"{1000 * seconds / max(sizes):.2f} ms each; p(k) = P(n_unique <= k)):\n")
    print("| directions | E[n_unique] | SE | p(49) | SE | p(48) | SE | precise enough |\n|---:|---:|---:|---:|---:|---:|---:|---|")
    for size in sizes:
        e = pool_estimates(ids[:size], 50)
        cdf = e.at_most / e.n_simulations
        print(f"| {size} | {e.expected:.4f} | {e.expected_se:.4f} | {cdf[49]:.4f} | {e.cdf_se[49]:.4f} | "
              f"{cdf[48]:.5f} | {e.cdf_se[48]:.5f} | {'yes' if e.precise_enough() else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--decode", default="auto", help="decode paths, comma-separated: auto, fp32, bf16")
    parser.add_argument("--pool-table", action="store_true")
    parser.add_argument("--snapshots", action="store_true",
                        help="only the snapshots' cost: default snapshots against one at the last step")
    args = parser.parse_args()
    if args.snapshots:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_gpt2_small(Path(tmp))
            print(cpu_kind(model, Path(tmp)), flush=True)
            snapshot_overhead(model, Path(tmp), args.steps, args.repeats)
        return
    paths = args.decode.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_gpt2_small(root)
        print(cpu_kind(model, root) + "\n", flush=True)
        imports = {(modules, gc_off): statistics.median(import_seconds(modules, gc_off) for _ in range(3))
                   for modules in ("torch", "torch, transformers, lightning.pytorch", "amax_lightning.lightning.cli")
                   for gc_off in (False, True)}
        first = {path: [] for path in paths}
        second = {path: [] for path in paths}
        for repeat in range(args.repeats):
            for path in paths:  # alternating: the paths see the same machine
                cache = root / f"cache{repeat}-{path}"
                first[path].append(run_once(model, root / f"first{repeat}{path}", cache, args.steps, path))
                second[path].append(run_once(model, root / f"second{repeat}{path}", cache, args.steps, path))
        pieces = {path: end_of_fit_pieces(model, root, path) for path in paths}
        if args.pool_table:
            pool_table(model)
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    print(f"\ntime to result, GPT-2 small shape (random weights), {args.steps} steps, 10 seeds; medians of "
          f"{args.repeats}; seconds; decode path as $AMAX_LIGHTNING_DECODE\n")
    print("| phase | " + " | ".join(f"first run, {p} | second run, {p}" for p in paths) + " |")
    print("|---|" + "---:|---:|" * len(paths))
    for key, label in (("before_steps", "imports, parsing, model load, setup"), ("steps", "optimization steps"),
                       ("after_steps", "analysis, report, TensorBoard, until the path is printed"),
                       ("to_path", "**start to printed path**"), ("exit", "printed path to exit"),
                       ("total", "start to exit")):
        print(f"| {label} | " + " | ".join(f"{median(first[p], key):.1f} | {median(second[p], key):.1f}"
                                           for p in paths) + " |")
    for path in paths:
        for runs, name in ((first[path], "first"), (second[path], "second")):
            print(f"\n{path}, {name} run: printed path / steps = "
                  f"{median(runs, 'to_path') / median(runs, 'steps'):.2f}x, printed path - steps = "
                  f"{median(runs, 'to_path') - median(runs, 'steps'):.1f} s (to exit: "
                  f"{median(runs, 'total') / median(runs, 'steps'):.2f}x, "
                  f"{median(runs, 'total') - median(runs, 'steps'):.1f} s)")
    print("\nimports alone in a fresh interpreter (median of 3), collector on / off (the command runs with it off):")
    for (modules, gc_off), seconds in imports.items():
        if gc_off:
            print(f"  import {modules}: {imports[modules, False]:.2f} / {seconds:.2f} s")
    for path in paths:
        print(f"{path}: " + ", ".join(f"{label} {value:.2f} s" if isinstance(value, float) else f"{label} {value}"
                                      for label, value in pieces[path].items()))


if __name__ == "__main__":
    main()
