"""A whole SAE as one job, measured: every latent of a random SAE of GPT-2 small's jb width (24,576) x 10 seeds on the
tiny random-init GPT-2 (3 blocks, 64 wide, GPT-2's real tokenizer), end to end through the CLI.

Prints the latents per hour and the split between the steps, the analysis, and the page and tables, read off the
run's own progress lines; with ``--processes 2`` the same under DDP (gloo, ``--trainer.devices 2``), and with
``--srun 2`` under the tests' one-host SLURM (``srun -n 2``, one thread per task; started here, root only), for
a side-by-side ratio in one call. Peak RSS of each process
comes from ``/usr/bin/time -v`` where it exists.

    python benchmarks/whole_sae.py [--latents 24576] [--steps 10] [--processes 1,2] [--srun 0] [--corpus-tokens 0]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def prepare(work: Path, latents: int) -> tuple[Path, Path]:
    """The tiny GPT-2 and a random SAE of ``latents`` latents on its ``blocks.2.hook_resid_pre``, in ``work``."""
    import torch
    from conftest import save_model, tiny_gpt2_config, write_sae
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = save_model(GPT2LMHeadModel(tiny_gpt2_config()), work / "tiny-gpt2")
    sae = write_sae(work / "sae", "6.x", hook="blocks.2.hook_resid_pre", d_sae=latents)
    return model, sae


def fit_args(model: Path, sae: Path, steps: int) -> list[str]:
    return ["fit", "--model.model_name_or_path", str(model), "--model.target", f"sae:{sae}:*", "--seeds", "0-9",
            "--model.lr", "0.01", "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "50"]


def phases(stderr: str) -> dict[str, float]:
    """Seconds of each phase, from the run's own closing lines on stderr."""
    found = {}
    for name, pattern in (("analysis", r"^analysis.* done in (.+?) \("), ("null model", r"^null model.* done in (.+?) \("),
                          ("corpus pass", r"^corpus pass.* done in (.+?) \("),
                          ("page and tables", r"wrote the atlas .* in (.+)$")):
        match = re.search(pattern, stderr, re.M)
        if match:
            found[name] = seconds(match.group(1))
    return found


def seconds(text: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+) (h|min|s)\b", text):
        total += int(value) * {"h": 3600, "min": 60, "s": 1}[unit]
    return total


def run(args: list[str], cwd: Path, launcher: list[str]) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    timer = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") and not launcher else []
    started = time.perf_counter()
    proc = subprocess.run([*launcher, *timer, sys.executable, "-m", "amax_lightning", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rss = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    memory = re.search(r"memory per process: .*", proc.stderr)
    corpus = re.search(r"corpus pass after the steps: .*", proc.stderr)
    sizes = {p.name: p.stat().st_size for p in cwd.rglob("*") if p.is_file() and p.suffix in (".parquet", ".html", ".json", ".ckpt")}
    return {"wall_s": wall, "phases": phases(proc.stderr), "peak_rss_gb": max((int(k) for k in rss), default=0) / 1e6,
            "memory_line": memory.group(0) + (f"; {corpus.group(0)}" if corpus else "") if memory else "", "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--processes", default="1,2", help="DDP process counts to run (gloo), comma-separated")
    parser.add_argument("--srun", type=int, default=0, help="also run under srun -n N on the local SLURM")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: the default)")
    parser.add_argument("--snapshot-every", default="",
                        help="comma-separated --results.snapshot_every values to compare on 1 process ('default': "
                             "about 20 snapshots), e.g. default,100: the snapshots' share of the fit (issue 27)")
    parser.add_argument("--every", type=int, default=0,
                        help="--results.snapshot_every for every run (0: the default, about 20 snapshots; a short "
                             "fit then snapshots every step)")
    parser.add_argument("--corpus-tokens", type=int, default=0,
                        help="also run 1 process with a corpus pass of this many tokens (windows of 32; this repo's "
                             "Markdown as a .txt corpus): its share of the job (issue 29)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amax-whole-sae-"))
    model, sae = prepare(work, args.latents)
    runs = []
    common = ["--threads", str(args.threads)] if args.threads else []
    common += ["--results.snapshot_every", str(args.every)] if args.every else []
    for n in [int(p) for p in args.processes.split(",") if p]:
        extra = common + ([] if n == 1 else ["--trainer.devices", str(n), "--trainer.strategy", "ddp"])
        runs.append((f"{n} process{'es' * (n > 1)}", run([*fit_args(model, sae, args.steps), *extra], work / f"p{n}", [])))
    for every in [e for e in args.snapshot_every.split(",") if e]:
        extra = common + ([] if every == "default" else ["--results.snapshot_every", every])
        runs.append((f"snapshots {every}", run([*fit_args(model, sae, args.steps), *extra], work / f"snap{every}", [])))
    if args.corpus_tokens:
        text = work / "corpus.txt"
        markdown = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(REPO.glob("*.md")))
        text.write_text("\n\n".join([markdown] * max(1, args.corpus_tokens // (len(markdown) // 4) + 2)), encoding="utf-8")
        corpus = ["--results.corpus", str(text), "--results.corpus_window", "32",
                  "--results.corpus_tokens", str(args.corpus_tokens)]
        runs.append(("with corpus", run([*fit_args(model, sae, args.steps), *common, *corpus], work / "corpus", [])))
    if args.srun:  # the tests' one-host SLURM (Debian's slurm-wlm and munge, as root), started here
        sys.path.insert(0, str(REPO / "tests" / "e2e"))
        from slurm_cluster import SlurmCluster

        cluster = SlurmCluster(work / "slurm")
        (work / "slurm").mkdir()
        cluster.start()
        os.environ.update(SLURM_CONF=cluster.env["SLURM_CONF"])
        try:
            launcher = ["srun", "-n", str(args.srun), "--kill-on-bad-exit=1"]
            runs.append((f"srun -n {args.srun}", run([*fit_args(model, sae, args.steps), "--threads", "1"],
                                                     work / f"srun{args.srun}", launcher)))
        finally:
            cluster.stop()
    print(f"{args.latents:,} latents x 10 seeds, {args.steps} steps, tiny GPT-2 (d_model 64), {os.cpu_count()} CPU cores"
          + (f", {args.threads} thread(s) per process" if args.threads else ""))
    print(f"{'run':<14} {'wall':>8} {'steps+start':>12} {'null':>6} {'corpus':>7} {'analysis':>9} {'page+tables':>12} "
          f"{'latents/h':>10} {'peak RSS':>9}")
    for name, result in runs:
        p = result["phases"]
        rest = result["wall_s"] - sum(p.values())
        print(f"{name:<14} {result['wall_s']:>7.0f}s {rest:>11.0f}s {p.get('null model', 0):>5.0f}s "
              f"{p.get('corpus pass', 0):>6.0f}s {p.get('analysis', 0):>8.0f}s {p.get('page and tables', 0):>11.0f}s "
              f"{args.latents / result['wall_s'] * 3600:>10,.0f} {result['peak_rss_gb']:>8.2f}G")
    for name, result in runs:
        print(f"{name}: {result['memory_line']}")
        print(f"{name}: files " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(result["sizes"].items())))


if __name__ == "__main__":
    main()
