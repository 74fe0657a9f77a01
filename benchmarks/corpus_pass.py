"""The corpus pass, measured: tokens per second on this machine's CPU cores for one unit on the test GPT-2 (3 blocks,
64 wide, windows of 32) and on a GPT-2-small-shaped random model (12 blocks, 768 wide, residual dim 91 entering
block 8, windows of 128); and for a random SAE of 24,576 latents on each (block 2 of the test GPT-2, block 8 of
the GPT-2-small shape), every latent in one pass against one latent, side by side (medians of ``--repeats``).

The text is this repository's Markdown, repeated to the budget (the pass reads it through ``datasets`` as a user's
.txt corpus). Times include tokenizing, both passes (statistics, then the examples' windows) and nothing else.

    python benchmarks/corpus_pass.py [--tokens 50000] [--small-tokens 8000] [--sae-tokens 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def corpus_file(folder: Path, tokens: int) -> Path:
    """A .txt corpus of about ``tokens`` GPT-2 tokens (a little more) from the repo's Markdown, paragraph by paragraph."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(REPO.glob("*.md")))
    repeats = max(1, int(tokens / (len(text) / 4)) + 2)  # about 4 characters per token
    path = folder / "corpus.txt"
    path.write_text("\n\n".join([text] * repeats), encoding="utf-8")
    return path


def timed_pass(backbone, spec, target: str, repeats: int) -> tuple[float, int, int]:
    """Median seconds of the corpus pass over the units of ``target``, the counted tokens and the units read."""
    from amax_lightning.analysis.corpus_pass import corpus_pass
    from amax_lightning.model.readout import build_readout

    built = build_readout(target, backbone, 1)
    identity = torch.tensor([t.flat_index(backbone.shape.d_head) for t in built.targets])

    def read(inputs):
        return built.readout.read_units(backbone.hook_values(inputs, built.targets[0]))

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = corpus_pass(spec, backbone.tokenizer, backbone.embed_tokens, read, identity, torch.device("cpu"),
                            progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), found.n_windows * spec.window, len(identity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="budget for the one-unit runs on the test GPT-2")
    parser.add_argument("--small-tokens", type=int, default=8_192, help="budget on the GPT-2-small-shaped model")
    parser.add_argument("--sae-tokens", type=int, default=20_000, help="budget for the 24,576-latent comparison")
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from conftest import save_model, tiny_gpt2_config, write_sae
    from transformers import GPT2LMHeadModel

    from amax_lightning.analysis.corpus_source import corpus_spec
    from amax_lightning.model.backbone import load_backbone

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text = corpus_file(work, max(args.tokens, args.small_tokens, args.sae_tokens))
        torch.manual_seed(0)
        tiny = load_backbone(str(save_model(GPT2LMHeadModel(tiny_gpt2_config()), work / "tiny")))
        small = load_backbone(str(save_model(GPT2LMHeadModel(tiny_gpt2_config(
            n_layer=12, n_embd=768, n_head=12, n_positions=1024)), work / "small")))
        sae = write_sae(work / "sae", "6.x", hook="blocks.2.hook_resid_pre", d_sae=args.latents)
        small_sae = write_sae(work / "small_sae", "6.x", hook="blocks.8.hook_resid_pre", d_in=768, d_sae=args.latents)
        rows = []
        for name, backbone, target, tokens, window in (
                ("test GPT-2, resid 2:5", tiny, "blocks.2.hook_resid_pre:5", args.tokens, 32),
                ("GPT-2-small shape, resid 8:91", small, "blocks.8.hook_resid_pre:91", args.small_tokens, 128),
                ("test GPT-2, SAE latent 0", tiny, f"sae:{sae}:0", args.sae_tokens, 32),
                (f"test GPT-2, SAE all {args.latents:,} latents", tiny, f"sae:{sae}:*", args.sae_tokens, 32),
                ("GPT-2-small shape, SAE latent 0 at block 8", small, f"sae:{small_sae}:0", args.small_tokens, 128),
                (f"GPT-2-small shape, SAE all {args.latents:,} latents at block 8", small, f"sae:{small_sae}:*",
                 args.small_tokens, 128)):
            spec = corpus_spec(str(text), tokens=tokens, window=window)
            seconds, fed, units = timed_pass(backbone, spec, target, args.repeats)
            rows.append((name, units, fed, seconds))
            print(f"{name}: {fed:,} tokens x {units:,} unit(s) in {seconds:.2f} s = {fed / seconds:,.0f} tokens/s",
                  flush=True)
        for model, (one, every) in (("test GPT-2", (rows[2][3], rows[3][3])),
                                    ("GPT-2-small shape", (rows[4][3], rows[5][3]))):
            print(f"\n{model}: all {args.latents:,} latents in one pass took {every / one:.1f}x the time of one "
                  f"latent ({args.latents:,} separate passes would take {args.latents:,}x)")
        print("\n| run | units | tokens | seconds (median) | tokens/s |\n|---|---:|---:|---:|---:|")
        for name, units, fed, seconds in rows:
            print(f"| {name} | {units:,} | {fed:,} | {seconds:.2f} | {fed / seconds:,.0f} |")


if __name__ == "__main__":
    main()
