"""How n_unique moves with the steps, on the random-weight GPT-2 the tests make (3 blocks, 64 wide, GPT-2's tokenizer,
``torch.manual_seed(0)``): ``configs/steps_curve.yaml`` (5,000 steps, a snapshot every 100) at its
``blocks.2.hook_resid_pre:5``, 10 seeds, through the CLI. Prints n_unique, the changed fraction and the mean
objective at the snapshots, and the verdict. On GPT-2 small run the config itself (README, "How n_unique moves").

    python benchmarks/steps_curve.py [--target blocks.2.hook_resid_pre:5] [--at 100,200,500,1000,2000,5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="blocks.2.hook_resid_pre:5")
    parser.add_argument("--at", default="100,200,300,400,500,1000,2000,3000,4000,5000")
    args = parser.parse_args()
    import torch
    from conftest import save_model, tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    work = Path(tempfile.mkdtemp(prefix="amax-steps-curve-"))
    torch.manual_seed(0)
    model = save_model(GPT2LMHeadModel(tiny_gpt2_config()), work / "tiny-gpt2")
    proc = subprocess.run([sys.executable, "-m", "amax_lightning", "fit", "--config",
                           str(REPO / "configs" / "steps_curve.yaml"), "--model.model_name_or_path", str(model),
                           "--model.target", args.target, "--trainer.accelerator", "cpu",
                           "--trainer.enable_progress_bar", "false"], cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    convergence, at = results["convergence"], {int(s) for s in args.at.split(",")}
    print(f"{args.target}, 10 seeds, lr {results['lr']}, random-weight tiny GPT-2 (seed 0)")
    print("| step | n_unique | changed since the previous snapshot | mean objective |\n|---:|---:|---:|---:|")
    for snapshot in convergence["snapshots"]:
        if snapshot["step"] in at:
            print(f"| {snapshot['step']:,} | {snapshot['n_unique']} | {snapshot['changed_fraction']:.2f} | "
                  f"{snapshot['mean_objective']:.3g} |")
    print(f"verdict: {convergence['verdict']}")


if __name__ == "__main__":
    main()
