"""Per-step cost of the activation-maximization study: naive notebook loop vs ActMaxModule vs the atlas shape.

Random-init GPT-2 small (``GPT2Config()`` defaults, nothing is downloaded), eval mode, frozen; target
``blocks.8.hook_resid_pre:91`` (HF ``hidden_states[8][..., 91]``), 5 tokens, Adam lr 1e-3. Everything is
timed in ONE process, medians over ``--repeats``, so ratios are side by side on the same (noisy) machine.

    python benchmarks/bench_study.py --device cpu --repeats 5 --steps 3
    python benchmarks/bench_study.py --device cuda --repeats 10 --steps 20 --atlas-chunk 0

Cases (all per optimizer step of the whole study):
  naive        10 seeds one after another, batch 1, full HF forward (12 blocks, output_hidden_states=True),
               loss = -hidden_states[8][0, :, 91].mean(), one Adam per seed (the course notebook)
  ours/raw     ActMaxModule: module.backbone forward of the (10, 5, 768) parameter, gather of the unit,
               loss, backward, Adam step -- no Lightning
  ours/fit     the same module under Trainer.fit (logger off, progress bar off, no checkpoints); per step =
               median interval between consecutive on_train_batch_start calls (so it holds Lightning's
               loop, self.log of 14 keys, the finiteness check, Adam, zero_grad)
  gemm floor   only the matmuls of the forward + input-gradient backward, at the study's shapes (M = 50 rows):
               what the FLOPs cost at this machine's GEMM speed for these skinny shapes
  atlas        768 units x 10 seeds = 7,680 rows of 5 tokens, parameter (7680, 5, 768), each row's own unit
               gathered; on CPU run in --atlas-chunk row chunks (gradients accumulate, one Adam step)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import torch
from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import amax_lightning.module as am_module  # noqa: E402
from amax_lightning.backbone import Backbone  # noqa: E402
from amax_lightning.callbacks import ResultsWriter  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

TOKENIZER_DIR = REPO / "tests" / "fixtures" / "gpt2_tokenizer"
LAYER, UNIT, N_TOKENS, N_SEEDS, LR = 8, 91, 5, 10, 1e-3


# --- FLOP count ----------------------------------------------------------------------------------------
def study_flops(rows: int, n_tokens: int = N_TOKENS, n_blocks: int = LAYER, d: int = 768, d_mlp: int = 3072,
                fwd_blocks: int | None = None) -> float:
    """Matmul FLOPs of one step: forward through ``fwd_blocks`` (default n_blocks) + input-grad backward through n_blocks.

    Per token and block, forward: c_attn 2*d*3d + attn c_proj 2*d*d + c_fc 2*d*d_mlp + mlp c_proj 2*d_mlp*d
    = 24 d^2 for d_mlp = 4d, plus attention scores QK^T and P@V, 2*T*d each (full T x T, not halved for the
    causal mask) = 4 T d. Backward w.r.t. the INPUT only (weights are frozen): each linear costs the same as
    its forward (dX = dY W^T) = 24 d^2, and attention needs dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    = 8 T d. Layernorm, GELU, softmax, Adam are O(d) per token and left out (< 0.1 %).
    Total = rows * T * n_blocks * (48 d^2 + 12 T d); for 10 rows, T=5, 8 blocks: 11.34 GFLOP.
    The naive loop also runs blocks 8..11 forward (``fwd_blocks=12``), useless work not in the "useful" count.
    """
    fwd_blocks = n_blocks if fwd_blocks is None else fwd_blocks
    linear = 2 * (d * 3 * d + d * d + d * d_mlp + d_mlp * d)
    fwd = linear + 4 * n_tokens * d
    bwd = linear + 8 * n_tokens * d
    return rows * n_tokens * (fwd_blocks * fwd + n_blocks * bwd)


# --- measurement helpers -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _busy_jiffies() -> tuple[int, int]:
    """(all CPUs' busy jiffies, this process's utime+stime jiffies), to see how much CPU others took meanwhile."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])


class ForeignLoad:
    """Share of all CPUs used by OTHER processes while the block ran (0 = the machine was ours alone)."""

    def __enter__(self):
        self.t0, (self.b0, self.o0) = time.perf_counter(), _busy_jiffies()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        b1, o1 = _busy_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        self.value = max(0.0, ((b1 - self.b0) - (o1 - self.o0)) / hz / (wall * os.cpu_count()))


FOREIGN: dict[str, float] = {}


def median_time(fn, repeats: int, steps: int, device: str, warmup: int = 1) -> float:
    """Median over ``repeats`` of (time of ``steps`` calls) / steps, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    with ForeignLoad() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times.append((time.perf_counter() - start) / steps)
    FOREIGN["last"] = load.value
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def peak_memory(device: str, out: dict, key: str):
    """Peak memory of the block, MiB: CUDA max_memory_allocated, CPU peak RSS (VmHWM reset via clear_refs)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:  # writing 5 resets the peak-RSS counter (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss_kib("VmRSS") * 1024
    yield
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    out[key] = (peak / 2**20, (peak - base) / 2**20)


def matmul_ceiling(device: str, repeats: int) -> float:
    """fp32 FLOP/s of a large square matmul on this device, best of repeats (TF32 off on CUDA: a true fp32 ceiling)."""
    n = 4096 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    steps = 1 if device == "cpu" else 10
    a @ b
    sync(device)
    times = []
    for _ in range(max(repeats, 5)):  # best of the repeats, not the median: a ceiling (and a strict floor)
        start = time.perf_counter()
        for _ in range(steps):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return 2 * n**3 / min(times)


def gemm_floor(device: str, rows: int, repeats: int, steps: int, d: int = 768, d_mlp: int = 3072) -> float:
    """Seconds for only the matmuls of one study step (forward + input-grad) at M = rows * tokens.

    8 blocks x (4 forward GEMMs + 4 transposed ones), with GPT-2's own weight layout (Conv1D: x @ W).
    """
    m = rows * N_TOKENS
    shapes = [(d, 3 * d), (d, d), (d, d_mlp), (d_mlp, d)]
    ws = [[torch.randn(k, n, device=device) for k, n in shapes] for _ in range(LAYER)]  # distinct weights: no cache reuse
    xs = {k: torch.randn(m, k, device=device) for k in (d, d_mlp)}
    gs = {n: torch.randn(m, n, device=device) for n in (d, 3 * d, d_mlp)}

    def run():
        for block in ws:
            for w in block:
                xs[w.shape[0]] @ w
        for block in reversed(ws):
            for w in reversed(block):
                gs[w.shape[1]] @ w.T

    return median_time(run, repeats, steps, device)


# --- models --------------------------------------------------------------------------------------------
def random_gpt2(device: str) -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config()).eval().requires_grad_(False).to(device)


def make_module(target: str, device: str) -> am_module.ActMaxModule:
    """The real ActMaxModule, with load_backbone swapped for a random-init GPT-2 small (no hub, no disk)."""
    tokenizer = GPT2Tokenizer.from_pretrained(TOKENIZER_DIR)
    original = am_module.load_backbone
    am_module.load_backbone = lambda *a, **k: Backbone(random_gpt2("cpu"), tokenizer)
    try:
        module = am_module.ActMaxModule(model_name_or_path="gpt2", target=target, n_tokens=N_TOKENS, lr=LR,
                                        seeds=list(range(N_SEEDS)))
    finally:
        am_module.load_backbone = original
    return module.to(device)


def naive_step_fn(model: GPT2Model, device: str):
    """The notebook: one seed after another, batch 1, full forward with output_hidden_states."""
    scale = float(model.wte.weight.std())
    params, opts = [], []
    for seed in range(N_SEEDS):
        g = torch.Generator().manual_seed(seed)
        p = (torch.randn(1, N_TOKENS, model.config.n_embd, generator=g) * scale).to(device).requires_grad_(True)
        params.append(p)
        opts.append(torch.optim.Adam([p], lr=LR))

    def step():
        for p, opt in zip(params, opts):
            opt.zero_grad()
            hidden = model(inputs_embeds=p, output_hidden_states=True).hidden_states
            loss = -hidden[LAYER][0, :, UNIT].mean()
            loss.backward()
            opt.step()

    return step


def raw_step_fn(module: am_module.ActMaxModule, chunk: int = 0):
    """ActMaxModule's own forward pieces (backbone forward, per-row unit gather, loss), backward, Adam; no Lightning.

    ``chunk`` > 0 runs the rows in chunks; gradients accumulate into the one parameter before one Adam step.
    """
    opt = module.configure_optimizers()
    n = module.n_rows
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)] if chunk else [(0, n)]

    def step():
        opt.zero_grad()
        for start, stop in bounds:
            rows = slice(start, stop)
            embedding = module.embeddings(module.parameter[rows])
            model_input = module.model_input(embedding)
            activations = module.position_activations(model_input, rows)
            loss = module.per_seed_loss(embedding, model_input, activations)
            loss.sum().backward()
        opt.step()

    return step, bounds


class _NoResults(ResultsWriter):
    """Stands in for the end-of-fit ResultsWriter (decode, null model, files): not per-step work."""

    def on_train_end(self, trainer, module) -> None:
        pass


class _StepClock(Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sync(module.device.type)
        self.starts.append(time.perf_counter())


def lightning_fit(module, device: str, steps: int, repeats: int) -> tuple[float, float]:
    """(median per-step time inside Trainer.fit, median wall time of the whole fit of steps+2 steps)."""
    per_step, walls = [], []
    for _ in range(repeats):
        clock = _StepClock()
        trainer = Trainer(
            accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps + 2, logger=False,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            callbacks=[_NoResults(), clock], default_root_dir="/tmp/amax_bench",
        )
        start = time.perf_counter()
        trainer.fit(module)
        sync(device)
        walls.append(time.perf_counter() - start)
        intervals = [b - a for a, b in zip(clock.starts[1:], clock.starts[2:])]  # skip the first step
        per_step.append(statistics.median(intervals))
    return statistics.median(per_step), statistics.median(walls)


# --- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case; the median is reported")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--atlas-chunk", type=int, default=None,
                    help="rows per forward/backward chunk of the atlas step (0: all 7,680 at once; default 768 "
                         "on CPU, 0 on CUDA)")
    ap.add_argument("--atlas-repeats", type=int, default=None, help="default 1 on CPU, --repeats on CUDA")
    ap.add_argument("--atlas-steps", type=int, default=None, help="default 1 on CPU, --steps on CUDA")
    ap.add_argument("--skip-atlas", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere, as the CPU run
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = device == "cpu"
    atlas_chunk = args.atlas_chunk if args.atlas_chunk is not None else (768 if cpu else 0)
    atlas_repeats = args.atlas_repeats or (1 if cpu else args.repeats)
    atlas_steps = args.atlas_steps or (1 if cpu else args.steps)
    R, S = args.repeats, args.steps

    name = torch.cuda.get_device_name() if not cpu else f"CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}"
    print(f"# torch {torch.__version__}, {name}, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, float] = {}
    mem: dict[str, tuple[float, float]] = {}
    other: dict[str, float] = {}  # CPU share other processes took while each case ran

    ceiling = matmul_ceiling(device, R)
    print(f"fp32 matmul ceiling (square {4096 if cpu else 8192}): {ceiling / 1e9:.1f} GFLOP/s", flush=True)
    useful = study_flops(N_SEEDS)
    naive_work = study_flops(N_SEEDS, fwd_blocks=12)
    print(f"FLOPs per step, 10 seeds: {useful / 1e9:.2f} G useful (fwd + input-grad bwd, 8 blocks); "
          f"naive loop does {naive_work / 1e9:.2f} G (forward runs all 12 blocks)", flush=True)

    results["gemm floor"] = gemm_floor(device, N_SEEDS, R, S)
    other["gemm floor"] = FOREIGN["last"]
    print(f"gemm floor (matmuls only, M=50): {results['gemm floor'] * 1e3:.1f} ms", flush=True)

    model = random_gpt2(device)
    with peak_memory(device, mem, "naive"):
        results["naive"] = median_time(naive_step_fn(model, device), R, max(1, S // 2 if cpu else S), device)
    other["naive"] = FOREIGN["last"]
    print(f"naive: {results['naive'] * 1e3:.1f} ms/step", flush=True)
    del model
    gc.collect()

    module = make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", device)
    step, _ = raw_step_fn(module)
    with peak_memory(device, mem, "ours/raw"):
        results["ours/raw"] = median_time(step, R, S, device)
    other["ours/raw"] = FOREIGN["last"]
    print(f"ours/raw: {results['ours/raw'] * 1e3:.1f} ms/step", flush=True)
    if not args.skip_fit:
        with peak_memory(device, mem, "ours/fit"):
            with ForeignLoad() as load:
                results["ours/fit"], fit_wall = lightning_fit(module, device, S * 2, R)
        other["ours/fit"] = load.value
        print(f"ours/fit: {results['ours/fit'] * 1e3:.1f} ms/step (Trainer.fit of {S * 2 + 2} steps: "
              f"{fit_wall:.2f} s wall)", flush=True)
    del module, step
    gc.collect()

    atlas_flops = study_flops(768 * N_SEEDS)
    if not args.skip_atlas:
        module = make_module(f"blocks.{LAYER}.hook_resid_pre:*", device)
        assert module.n_rows == 7680 and tuple(module.parameter.shape) == (7680, N_TOKENS, 768)
        step, bounds = raw_step_fn(module, atlas_chunk)
        with peak_memory(device, mem, "atlas"):
            if cpu:  # warm up on one chunk only: a full CPU step takes about a minute
                rows = slice(*bounds[0])
                module.position_activations(module.parameter[rows], rows).sum().backward()
                module.parameter.grad = None
            results["atlas"] = median_time(step, atlas_repeats, atlas_steps, device, warmup=0 if cpu else 1)
        other["atlas"] = FOREIGN["last"]
        print(f"atlas: {results['atlas']:.2f} s/step ({len(bounds)} chunk(s) of {bounds[0][1] - bounds[0][0]} rows)",
              flush=True)
        del module, step
        gc.collect()

    flops = {k: useful for k in ("naive", "ours/raw", "ours/fit", "gemm floor")}
    flops["atlas"] = atlas_flops
    naive = results["naive"]
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}; other% = CPU share other processes used meanwhile "
          f"(> ~5% on CPU: rerun, the numbers are contended); ratio = naive time / case time (per study step; "
          f"atlas: naive time x 768 units / atlas time); floor = useful FLOPs / square-matmul ceiling")
    header = f"{'case':<11} {'ms/step':>10} {'x naive':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'%ceil':>6} " \
             f"{'floor ms':>9} {'/floor':>7} {'peak MiB':>9} {'+MiB':>7} {'other%':>6}"
    print(header)
    print("-" * len(header))
    for key in ("naive", "ours/raw", "ours/fit", "gemm floor", "atlas"):
        if key not in results:
            continue
        t = results[key]
        ratio = naive * (768 if key == "atlas" else 1) / t
        rate = flops[key] / t
        floor = flops[key] / ceiling
        peak, delta = mem.get(key, (float("nan"), float("nan")))
        print(f"{key:<11} {t * 1e3:>10.1f} {ratio:>8.2f} {flops[key] / 1e9:>8.1f} {rate / 1e9:>8.1f} "
              f"{100 * rate / ceiling:>5.1f}% {floor * 1e3:>9.1f} {t / floor:>7.2f} {peak:>9.0f} {delta:>7.0f} "
              f"{100 * other.get(key, float('nan')):>5.0f}%")
    print(f"matmul ceiling {ceiling / 1e9:.1f} GFLOP/s ({'cpu' if cpu else torch.cuda.get_device_name()}); "
          f"500-step study: naive {naive * 500:.0f} s, ours/fit "
          f"{results.get('ours/fit', results['ours/raw']) * 500:.0f} s")


if __name__ == "__main__":
    main()
