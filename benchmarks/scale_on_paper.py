"""The atlas of every latent of an SAE on paper: FLOPs, H200 time from measured rates, nodes for one hour, sizes.

Pure arithmetic from the measured numbers in BENCHMARKS.md (no model runs): ``python benchmarks/scale_on_paper.py``.
GPT-2 small read at block 8 (8 of 12 blocks run), 5 tokens per row; rows = latents x seeds.
"""

from __future__ import annotations

import argparse

D, MLP, BLOCKS, TOKENS, VOCAB = 768, 3072, 8, 5, 50257
ATLAS_FP32_MS, ATLAS_BF16_COMPILED_MS, ATLAS_ROWS = 254.7, 56.2, 7680  # H200, BENCHMARKS.md "GPU: one NVIDIA H200"
ATLAS_FP32_TFLOPS, ATLAS_BF16_TFLOPS = 34.2, 154.9  # the same rows: the rates those steps reached
SAVED_MIB_PER_ROW = 1.19  # fp32 tensors autograd saves per row (README "Memory: chunked steps")
TABLE_BYTES_PER_ROW = 132  # rows.parquet (zstd), per unit x seed: 32.5 MB for 245,760 rows (benchmarks/whole_sae.py)
TABLE_BYTES_PER_UNIT = 252  # units.parquet, per unit: 6.2 MB for 24,576 units
CHECKPOINT_GB_PER_S = 2.0  # rank 0 writing last.ckpt (assumed local NVMe)
GPUS_PER_NODE, H200_GIB = 8, 141
MAX_ROWS, MAX_PARAMETER_ELEMENTS = 1_000_000, 2**31  # checks.py


def forward_flops_per_row() -> float:
    """Matmul FLOPs of one row's truncated forward: per token and block, attention's 4 d^2 and the MLP's 2 d x 4d."""
    return 2 * (4 * D * D + 2 * D * MLP) * BLOCKS * TOKENS


def continuous_flops_per_row_step() -> float:
    """Forward and the backward to the input (the weights are frozen: one more forward's worth)."""
    return 2 * forward_flops_per_row()


def gcg_flops_per_row_step(candidates: int = 128) -> float:
    """One gradient (forward + backward), the one-hot gradient (grad @ W_E.T) and the candidates' scoring forward,
    each child from its swap position on ((T + 1) / 2T of the positions)."""
    one_hot = 2 * TOKENS * D * VOCAB
    return continuous_flops_per_row_step() + one_hot + candidates * forward_flops_per_row() * (TOKENS + 1) / (2 * TOKENS)


def table(latents: int, seeds: int, steps: int) -> None:
    rows = latents * seeds
    row_steps = rows * steps
    fp32_s_per_row_step = ATLAS_FP32_MS / 1e3 / ATLAS_ROWS
    bf16_s_per_row_step = ATLAS_BF16_COMPILED_MS / 1e3 / ATLAS_ROWS
    print(f"{latents:,} latents x {seeds} seeds = {rows:,} rows, {steps} steps = {row_steps:.4g} row-steps")
    print(f"per row-step: continuous {continuous_flops_per_row_step() / 1e9:.3f} GFLOP "
          f"(measured on the H200 atlas: {ATLAS_FP32_TFLOPS * ATLAS_FP32_MS / ATLAS_ROWS:.3f}), "
          f"gcg {gcg_flops_per_row_step() / 1e9:.1f} GFLOP")
    print("| method | FLOPs | one H200, fp32 | one H200, bf16 compiled | 8-GPU nodes for 1 h (fp32 / bf16) |")
    print("|---|---:|---:|---:|---:|")
    for name, flops in (("continuous", continuous_flops_per_row_step()), ("gcg", gcg_flops_per_row_step())):
        total = flops * row_steps
        if name == "continuous":  # measured seconds per row-step of the atlas
            fp32, bf16 = row_steps * fp32_s_per_row_step, row_steps * bf16_s_per_row_step
        else:  # no GPU rate measured for token search: the atlas's TFLOP/s applied to its FLOPs
            fp32, bf16 = total / (ATLAS_FP32_TFLOPS * 1e12), total / (ATLAS_BF16_TFLOPS * 1e12)
        nodes = [max(1, -(-t / 3600 // GPUS_PER_NODE)) for t in (fp32, bf16)]
        gpus = [-(-t // 3600) for t in (fp32, bf16)]
        print(f"| {name} | {total:.3g} | {fp32 / 3600:.2f} h | {bf16 / 3600:.2f} h | "
              f"{nodes[0]:.0f} / {nodes[1]:.0f} ({gpus[0]:.0f} / {gpus[1]:.0f} GPUs) |")
    state = rows * TOKENS * D * 4
    print(f"parameter {state / 2**30:.2f} GiB, with Adam's moments {3 * state / 2**30:.2f} GiB, on every process "
          f"(each holds every row); checkpoint {3 * state / 2**30:.2f} GiB (a sweep keeps no activation history)")
    print(f"saved tensors for one chunk of all rows: {rows * SAVED_MIB_PER_ROW / 1024:.0f} GiB (chunked to fit half "
          f"the free memory); tables {(rows * TABLE_BYTES_PER_ROW + rows / seeds * TABLE_BYTES_PER_UNIT) / 2**30:.2f} "
          f"GiB (results.json: a few kB)")
    print(f"every step: {rows * 16 / 2**20:.1f} MiB of per-row stats to every process; no gather at the end (each "
          f"process analyses its blocks from its own copy of the parameter)")
    limits = []
    if rows > MAX_ROWS:
        limits.append(f"rows {rows:,} > {MAX_ROWS:,}")
    if rows * TOKENS * D > MAX_PARAMETER_ELEMENTS:
        limits.append(f"learned numbers {rows * TOKENS * D:.3g} > 2^31")
    if 3 * state / 2**30 > H200_GIB:
        limits.append(f"parameter + Adam {3 * state / 2**30:.0f} GiB > one H200's {H200_GIB} GiB")
    print("breaks: " + ("; ".join(limits) if limits else "nothing of the above"))


# The end of a sweep (issue 26), measured on 2 CPU cores at full width (benchmarks/whole_sae.py, BENCHMARKS.md
# "A whole SAE"): rank 0's merge of the blocks, atlas.csv and the page, and each block's host work (metrics, strings,
# Parquet) besides its matmuls; both are independent of d_model.
MERGE_AND_PAGE_S = 20.0
HOST_S_PER_BLOCK = 0.15  # 256 units x 10 seeds
BLOCK_UNITS = 256


def analysis_flops_per_row() -> float:
    """The end-of-fit analysis of one row: the cosine decode of its 5 vectors against the vocabulary and two
    forwards (at the optimized input and at the decoded tokens)."""
    return 2 * TOKENS * VOCAB * D + 2 * forward_flops_per_row()


def whole_sae(latents: int, seeds: int, steps: int, gpus_list=(1, 8, 32)) -> None:
    """Steps, analysis and page of a whole-SAE job on 1, 8 and 32 H200s (one process each), continuous and GCG."""
    rows = latents * seeds
    blocks = -(-latents // BLOCK_UNITS)
    print(f"whole SAE: {latents:,} latents x {seeds} seeds, {steps} steps; analysis {analysis_flops_per_row() / 1e9:.2f}"
          f" GFLOP a row ({rows * analysis_flops_per_row():.3g} in all), {blocks} blocks")
    checkpoints = (steps // 50) * 3 * rows * TOKENS * D * 4 / (CHECKPOINT_GB_PER_S * 1e9)  # every 50 steps, rank 0
    print(f"last.ckpt every 50 steps: {steps // 50} x {3 * rows * TOKENS * D * 4 / 1e9:.1f} GB = {checkpoints:.0f} s "
          f"at {CHECKPOINT_GB_PER_S} GB/s (in every row below)")
    print("| H200s | method | steps (fp32 / bf16) | analysis | merge + page | total, bf16 | latents per hour, bf16 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for method, flops in (("continuous", continuous_flops_per_row_step()), ("gcg", gcg_flops_per_row_step())):
        if method == "continuous":
            fp32, bf16 = (rows * steps * ms / 1e3 / ATLAS_ROWS for ms in (ATLAS_FP32_MS, ATLAS_BF16_COMPILED_MS))
        else:
            fp32, bf16 = (flops * rows * steps / (rate * 1e12) for rate in (ATLAS_FP32_TFLOPS, ATLAS_BF16_TFLOPS))
        for gpus in gpus_list:
            analysis = rows * analysis_flops_per_row() / (ATLAS_FP32_TFLOPS * 1e12) / gpus \
                + -(-blocks // gpus) * HOST_S_PER_BLOCK
            total = bf16 / gpus + analysis + MERGE_AND_PAGE_S + checkpoints
            print(f"| {gpus} | {method} | {fp32 / gpus / 60:,.1f} / {bf16 / gpus / 60:,.1f} min | {analysis:.0f} s | "
                  f"{MERGE_AND_PAGE_S:.0f} s | {total / 60:,.1f} min | {latents / total * 3600:,.0f} |")


H200_TB_PER_S = 4.8  # HBM3e bandwidth
STATS_KERNELS, STATS_BYTES = 12, 6  # the statistics' passes over each unit-token value and bytes each reads/writes


def corpus_pass(latents: int, tokens: int = 3_000_000, window: int = 128) -> None:
    """The corpus pass of a whole SAE on one H200: the forwards (both passes; the second reads at most every
    window again) at the measured fp32 rate, and a bandwidth floor for the per-unit statistics (not measured on a GPU)."""
    forward = 2 * (4 * D * D + 2 * D * MLP) * BLOCKS  # per token, blocks 0..7
    encode = 2 * D * latents
    flops = 2 * tokens * (forward + encode)
    values = tokens * latents
    floor = values * STATS_KERNELS * STATS_BYTES / (H200_TB_PER_S * 1e12)
    examples = latents * (20 + 50) * window * 4
    print(f"corpus pass of {latents:,} latents over {tokens:,} tokens (windows of {window}) on 1 H200: "
          f"{flops:.3g} FLOP of forwards and encoder = {flops / (ATLAS_FP32_TFLOPS * 1e12):.0f} s at "
          f"{ATLAS_FP32_TFLOPS} TFLOP/s (fp32); statistics over {values:.3g} unit-token values, at least "
          f"{floor:.0f} s at {H200_TB_PER_S} TB/s; examples' activations {examples / 1e9:.2f} GB in memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latents", type=int, nargs="+", default=[24_576, 1_048_576])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    for latents in args.latents:
        table(latents, args.seeds, args.steps)
        print()
    whole_sae(args.latents[0], args.seeds, args.steps)
    print()
    corpus_pass(args.latents[0])


if __name__ == "__main__":
    main()
