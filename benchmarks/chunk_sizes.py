"""Cost per row of one chunk's forward + input gradient, by chunk size: where automatic chunks should stop.

Random-init GPT-2 small, target ``blocks.8.hook_resid_pre:*`` (each row its own unit), 5 tokens; each size
is timed ``--repeats`` times, sizes interleaved, medians printed in ms per row.

    python benchmarks/chunk_sizes.py --device cpu --sizes 128,256,384,512,640,1024 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_study import make_module, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="128,256,384,512,640,1024,3072")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    module = make_module("blocks.8.hook_resid_pre:*", args.device)

    def chunk(n: int) -> None:
        piece = module.parameter[:n].detach().requires_grad_()
        loss = module.objective(piece, slice(0, n)).loss.sum()
        torch.autograd.grad(loss, piece)
        sync(args.device)

    sizes = [int(n) for n in args.sizes.split(",")]
    chunk(sizes[0])  # warm-up
    per_row = {n: [] for n in sizes}
    for _ in range(args.repeats):
        for n in sizes:
            start = time.perf_counter()
            chunk(n)
            per_row[n].append((time.perf_counter() - start) / n)
    for n, times in per_row.items():
        print(f"{n:>6} rows: {statistics.median(times) * 1e3:.2f} ms/row", flush=True)


if __name__ == "__main__":
    main()
