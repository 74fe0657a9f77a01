"""Token search speed: sequences scored per second, amax_lightning's batched GCG against a per-seed loop.

The study's shape: GPT-2 small's architecture (random weights, real tokenizer), target
``blocks.8.hook_resid_pre:91``, 10 seeds, 5 tokens, ``top_k`` 256, ``candidates`` 128 per seed per step. The
reference is a hand-written loop in the style of nanoGCG: one seed at a time, the full model forward
(``output_hidden_states``), the one-hot gradient, 128 sampled swaps scored in one batch per seed, keep the best.
Both run the same number of steps after one warm-up step; the table gives the median seconds per step and
sequences scored per second (seeds x candidates per step). EPO (population 8) is timed too, on our side only.

    python benchmarks/token_search_speed.py [--steps 3] [--device cpu|cuda] [--methods gcg,epo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from time_to_result import write_gpt2_small  # noqa: E402

TARGET, LAYER, UNIT, SEEDS, N_TOKENS, TOP_K, CANDIDATES = "blocks.8.hook_resid_pre:91", 8, 91, 10, 5, 256, 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_seed_loop(folder: Path, device: torch.device, steps: int) -> list[float]:
    """Seconds per step (all seeds) of the nanoGCG-style reference loop."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
    vocab = model.get_input_embeddings().weight
    times = []
    tokens = {seed: torch.randint(vocab.shape[0] - 1, (N_TOKENS,), generator=torch.Generator().manual_seed(seed))
              .to(device) for seed in range(SEEDS)}
    for _ in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        for seed in range(SEEDS):
            ids = tokens[seed]
            one_hot = torch.nn.functional.one_hot(ids, vocab.shape[0]).to(vocab.dtype).requires_grad_()
            hidden = model(inputs_embeds=(one_hot @ vocab)[None], output_hidden_states=True).hidden_states[LAYER]
            (grad,) = torch.autograd.grad(hidden[0, :, UNIT].mean(), one_hot)
            grad[:, -1] = -torch.inf  # <|endoftext|>
            top = grad.topk(TOP_K, dim=-1).indices
            position = torch.randint(N_TOKENS, (CANDIDATES,), device=device)
            choice = torch.randint(TOP_K, (CANDIDATES,), device=device)
            candidates = ids.repeat(CANDIDATES, 1)
            candidates[torch.arange(CANDIDATES, device=device), position] = top[position, choice]
            with torch.no_grad():
                scores = model(input_ids=candidates, output_hidden_states=True).hidden_states[LAYER][..., UNIT].mean(-1)
            tokens[seed] = candidates[scores.argmax()]
        sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def ours(folder: Path, device: torch.device, steps: int, method: str) -> tuple[list[float], int]:
    """Seconds per step of ActMaxModule's search over all seeds at once, and its rows per chunk."""
    from amax_lightning.lightning.module import ActMaxModule

    module = ActMaxModule(str(folder), target=TARGET, seeds=list(range(SEEDS)), method=method, top_k=TOP_K,
                          candidates=CANDIDATES, retokenize=False).to(device)
    state, chunks = module.search_state(), module.row_chunks()
    times = []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        state, _ = module.search.step(state, chunks, step)
        sync(device)
        times.append(time.perf_counter() - start)
    return times[1:], module.chunk_rows_used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="gcg,epo")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_gpt2_small(Path(tmp))
        reference = statistics.median(per_seed_loop(folder, device, args.steps))
        rows = [("per-seed loop (nanoGCG style, full forward)", "gcg", reference, "-")]
        for method in args.methods.split(","):
            times, chunk = ours(folder, device, args.steps, method)
            rows.append((f"amax_lightning {method} (batched, truncated)", method, statistics.median(times), chunk))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"token search, {SEEDS} seeds x {CANDIDATES} candidates, top_k {TOP_K}, {N_TOKENS} tokens, {TARGET}, "
          f"GPT-2 small shape (random weights), {name}, torch {torch.__version__}, median of {args.steps} steps")
    print("| | method | s / step | sequences / s | vs per-seed loop | rows per chunk |")
    print("|---|---|---:|---:|---:|---:|")
    for label, method, seconds, chunk in rows:
        print(f"| {label} | {method} | {seconds:.4g} | {SEEDS * CANDIDATES / seconds:.4g} | "
              f"{reference / seconds:.2f}x | {chunk} |")


if __name__ == "__main__":
    main()
