"""The study on an SAE latent at GPT-2 small's shape: random GPT-2 small weights and a random SAE of the jb
release's shape (768 x 24,576 at blocks.8.hook_resid_pre, 6.x cfg.json asking for centred writing weights),
both written to a temp folder, then the CLI run as a user runs it. Prints wall time and peak memory (RSS).

    python benchmarks/sae_shape_run.py [--latents 91|top8@91|0-63] [extra fit args, e.g. --trainer.accelerator gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_models(root: Path) -> tuple[Path, Path]:
    """A random-init GPT-2 small (with the real tokenizer) and a random jb-shaped SAE under ``root``."""
    torch.manual_seed(0)
    model_dir, sae_dir = root / "gpt2-random", root / "sae-jb-shape"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(model_dir)
    GPT2Tokenizer.from_pretrained(REPO / "tests" / "fixtures" / "gpt2_tokenizer").save_pretrained(model_dir)
    d_in, d_sae = 768, 24_576
    weights = {"W_enc": torch.randn(d_in, d_sae) / d_in**0.5, "b_enc": torch.randn(d_sae) * 0.1,
               "W_dec": torch.randn(d_sae, d_in) / d_in**0.5, "b_dec": torch.randn(d_in) * 0.1}
    sae_dir.mkdir(parents=True)
    save_file(weights, str(sae_dir / "sae_weights.safetensors"))
    (sae_dir / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "architecture": "standard", "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.8.hook_resid_pre", "neuronpedia_id": "gpt2-small/8-res-jb",
                     "model_from_pretrained_kwargs": {"center_writing_weights": True}}}))
    return model_dir, sae_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", default="91", help="latent spec: 91, top8@91, 0-63, ...")
    args, extra = parser.parse_known_args()
    extra = extra[1:] if extra[:1] == ["--"] else extra  # a separating -- is not a fit argument
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, sae_dir = write_models(root)
        command = [sys.executable, "-m", "amax_lightning", "fit", "--config", str(REPO / "configs" / "reproduce.yaml"),
                   "--model.model_name_or_path", str(model_dir), "--model.target", f"sae:{sae_dir}:{args.latents}",
                   "--trainer.enable_progress_bar", "false", *extra]
        started = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        print(proc.stdout[-3000:], proc.stderr[-2000:] if proc.returncode else "", sep="\n")
        results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text()) if proc.returncode == 0 else {}
        unit = results.get("units", [results])[0] if results else {}
        print(f"command: python -m amax_lightning fit --config configs/reproduce.yaml --model.model_name_or_path "
              f"<random GPT-2 small> --model.target sae:<random jb-shaped SAE>:{args.latents} {' '.join(extra)}")
        print(f"exit {proc.returncode}; wall {wall:.1f} s (start to printed path, incl. imports and model load); "
              f"peak RSS {peak:.2f} GiB; cpu threads {torch.get_num_threads()}")
        if unit:
            print(f"sae record: {json.dumps(unit.get('sae'))}")


if __name__ == "__main__":
    main()
