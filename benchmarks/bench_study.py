"""Correctness on the device, what opt-in numerics change, then per-step cost: naive loop vs ours vs the atlas.

Random-init GPT-2 small (``GPT2Config()`` defaults, nothing is downloaded), eval mode, frozen; target
``blocks.8.hook_resid_pre:91`` (HF ``hidden_states[8][..., 91]``), 5 tokens, Adam lr 1e-3. Everything runs
in ONE process, medians over ``--repeats``, so ratios are side by side on the same (noisy) machine. The
compact tables come last; the exit status is 1 if a correctness check failed.

    python benchmarks/bench_study.py --device cpu --repeats 5 --steps 3 --skip-atlas
    python benchmarks/bench_study.py --device cuda --repeats 10 --steps 20
    python benchmarks/bench_study.py --tiny --repeats 1 --steps 1 --numerics-steps 2   # smoke run, seconds

1. Correctness on the device: the truncated forward against HF ``output_hidden_states``; fp32 activations
   and input gradient against an fp64 copy of the model; a chunked step's gradient against one batch; each
   ``compile_mode`` against eager.
2. Numerics: the 10-seed study for ``--numerics-steps`` steps in fp32 and in each opt-in variant (bf16-mixed;
   on CUDA also TF32 and 16-mixed; each compile mode); how many of the 50 decoded tokens differ from fp32,
   and the relative error of the final objective (evaluated in fp32).
3. Timings (per optimizer step of the whole study):
   naive         10 seeds one after another, batch 1, full HF forward (12 blocks, output_hidden_states=True),
                 loss = -hidden_states[8][0, :, 91].mean(), one Adam per seed (the course notebook)
   matmuls only  only the matmuls of the forward + input-gradient backward at the study's shapes (M = 50)
   ours/raw      the module's step without Lightning: chunked forward + exact gradient of its objective (under
                 its matmul precision), finiteness check, Adam with the priors' projections (CUDA: also bf16 autocast)
   ours/fit      the same module under Trainer.fit (logger off, no checkpoints); per step = median interval
                 between consecutive on_train_batch_start calls, the first (compiling) step left out;
                 CUDA adds bf16-mixed and TF32, and every compile mode
   atlas         768 units x 10 seeds = 7,680 rows of 5 tokens, each row's own unit, chunked as a run would
                 chunk it (automatic, from measured memory; --atlas-chunk to fix); CUDA adds bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import torch
from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lightning.pytorch import Callback, Trainer  # noqa: E402

import amax_lightning.lightning.module as am_module  # noqa: E402
from amax_lightning.base.errors import NonFiniteError  # noqa: E402
from amax_lightning.lightning.callbacks import ResultsWriter  # noqa: E402
from amax_lightning.model.backbone import Backbone  # noqa: E402
from amax_lightning.model.chunking import chunked_value_and_grad, float32_matmul_precision  # noqa: E402
from amax_lightning.model.decode import nearest_tokens  # noqa: E402

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


def matmul_ceiling(device: str, repeats: int, n: int | None = None) -> float:
    """fp32 FLOP/s of a large square (n x n) matmul on this device, best of repeats (TF32 off on CUDA: a true fp32
    ceiling); n defaults to 4,096 on CPU and 8,192 on GPU."""
    n = n or (4096 if device == "cpu" else 8192)
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


def gemm_only_step(device: str, rows: int, d: int = 768, d_mlp: int = 3072):
    """A step of only the matmuls of the study (forward + input-grad) at M = rows * tokens.

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

    return run


# --- models --------------------------------------------------------------------------------------------
CONFIG = GPT2Config()  # GPT-2 small; --tiny swaps in a small one for a smoke run of the whole script


def random_gpt2(device: str) -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(CONFIG).eval().requires_grad_(False).to(device)


def make_module(target: str, device: str, **options) -> am_module.ActMaxModule:
    """The real ActMaxModule on a ready random-init GPT-2 backbone (no hub, no disk)."""
    backbone = Backbone(random_gpt2("cpu"), GPT2Tokenizer.from_pretrained(TOKENIZER_DIR))
    module = am_module.ActMaxModule(model_name_or_path="gpt2", target=target, n_tokens=N_TOKENS, lr=LR,
                                    seeds=list(range(N_SEEDS)), backbone=backbone, **options)
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


def raw_gradient(module: am_module.ActMaxModule, chunks: list[slice]) -> torch.Tensor:
    """The module's step without Lightning: every chunk's forward and exact gradient (the continuous method's
    ``forward``, so compiled when ``compile_mode`` asks) inside its matmul precision, one finiteness check, the activation history.

    Returns the gradient of the summed loss with respect to the rows in ``chunks`` (single process: all rows).
    """
    with float32_matmul_precision(module.matmul_precision):
        grad, (_, activations, loss) = chunked_value_and_grad(module.algorithm.forward, module.parameter, chunks)
    if not bool(torch.isfinite(activations).all() & torch.isfinite(loss).all()):  # once per step: one host sync
        raise NonFiniteError(f"non-finite loss or activation at raw step {len(module.history)}")
    with torch.no_grad():
        module.history_steps.append(len(module.history))
        module.history.append(module.objective.objective(activations))
    return grad


def raw_step_fn(module: am_module.ActMaxModule, chunk: int = 0, autocast: torch.dtype | None = None):
    """The module's step (chunks, priors, finiteness check, history; ``raw_gradient``), then Adam; no Lightning.

    ``chunk`` > 0 fixes the rows per forward/backward chunk; ``autocast`` runs the step as Lightning's
    ``bf16-mixed`` / ``16-mixed`` precision does. Adam is ``configure_optimizers``' (it projects after each step).
    Returns ``(step, chunks)``.
    """
    module.chunk_rows_used = chunk or module.n_rows
    chunks = module.row_chunks()  # the whole run: one process, no Trainer (layout.shard is every row)
    opt = module.configure_optimizers()
    context = (lambda: torch.autocast(module.device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def step():
        with context():
            grad = raw_gradient(module, chunks)
        module.parameter.grad = grad
        opt.step()
        opt.zero_grad()

    return step, chunks


def _no_results() -> ResultsWriter:
    """A ResultsWriter that skips the end-of-fit work (decode, null model, files): not per-step work.

    An instance of ResultsWriter itself with its hook switched off, not a subclass: the module's
    ``configure_callbacks`` adds its own ResultsWriter unless the Trainer has one of exactly that type.
    """
    writer = ResultsWriter()
    writer.on_train_end = lambda trainer, module: None
    return writer


class _StepClock(Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sync(module.device.type)
        self.starts.append(time.perf_counter())


def lightning_fit(module, device: str, steps: int, repeats: int, precision: str = "32-true") -> tuple[float, float]:
    """(median per-step time inside Trainer.fit, median wall time of the whole fit of steps+2 steps)."""
    per_step, walls = [], []
    for _ in range(repeats):
        clock = _StepClock()
        trainer = Trainer(
            accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps + 2, logger=False,
            precision=precision, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            callbacks=[_no_results(), clock], default_root_dir="/tmp/amax_bench",
        )
        start = time.perf_counter()
        trainer.fit(module)
        sync(device)
        walls.append(time.perf_counter() - start)
        intervals = [b - a for a, b in zip(clock.starts[1:], clock.starts[2:])]  # skip the first step (compiles)
        per_step.append(statistics.median(intervals))
    return statistics.median(per_step), statistics.median(walls)


# --- correctness on the device, before any timing ------------------------------------------------------
CHECKS: list[tuple[str, float, float]] = []  # (what, measured error, allowed)


def check(what: str, error: float, allowed: float) -> None:
    CHECKS.append((what, error, allowed))
    print(f"{'ok  ' if error <= allowed else 'FAIL'} {what}: {error:.2e} (allowed {allowed:.0e})", flush=True)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def run_checks(device: str, compile_modes: list[str]) -> None:
    """Our forward, gradient, chunking and compiled step against independent references, on ``device``."""
    module = make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", device)
    x = module.parameter.detach().clone()
    hf = module.backbone.model(inputs_embeds=x, output_hidden_states=True).hidden_states[LAYER][..., UNIT]
    check("truncated forward vs HF hidden_states[8][..., 91] (fp32)", relative_error(module.backbone(x, module.target), hf), 1e-5)

    def grad_of(mod, inputs):
        inputs = inputs.clone().requires_grad_(True)
        mod.backbone(inputs, mod.target).mean(-1).sum().backward()
        return inputs.grad

    reference = make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", device).double()
    with torch.no_grad():
        want = reference.backbone(x.double(), reference.target)
    check("fp32 activations vs fp64 reference", relative_error(module.backbone(x, module.target), want), 1e-4)
    check("fp32 input gradient vs fp64 reference", relative_error(grad_of(module, x), grad_of(reference, x.double())), 1e-3)
    del reference

    sweep = make_module(f"blocks.{LAYER}.hook_resid_pre:0-5", device)  # 60 rows: one batch vs chunks of 16
    grads = []
    for chunk in (0, 16):
        _, chunks = raw_step_fn(sweep, chunk)
        grads.append(raw_gradient(sweep, chunks))
    check("chunked step gradient vs one batch (60 rows, chunks of 16)", relative_error(grads[1], grads[0]), 1e-5)
    for mode in compile_modes:
        compiled = make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", device, compile_mode=mode)
        start = time.perf_counter()
        activations = compiled.algorithm.forward(compiled.parameter, slice(0, compiled.n_rows)).activations.clone()
        sync(device)
        print(f"     compile_mode={mode}: first call {time.perf_counter() - start:.1f} s", flush=True)
        check(f"compile_mode={mode} activations vs eager", relative_error(activations, module.backbone(x, module.target)), 1e-4)
        sweep = make_module(f"blocks.{LAYER}.hook_resid_pre:0-5", device, compile_mode=mode)
        _, chunks = raw_step_fn(sweep, 20)  # three equal chunks: one compiled shape
        check(f"compile_mode={mode} chunked step gradient vs eager one batch",
              relative_error(raw_gradient(sweep, chunks), grads[0]), 1e-4)
        del compiled, sweep


# --- what opt-in numerics change ------------------------------------------------------------------------
def study_outcome(device: str, steps: int, precision: str = "32-true", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded token ids (seeds, tokens) and final objectives (seeds,) after ``steps`` raw steps of the study.

    ``options`` go to ActMaxModule (``matmul_precision``, ``compile_mode``); ``precision`` picks the autocast
    dtype as Lightning's ``bf16-mixed`` / ``16-mixed`` do (without 16-mixed's loss scaling). The final values are
    evaluated in fp32, eager, as the ResultsWriter reports them.
    """
    module = make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", device, **options)
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    step, _ = raw_step_fn(module, autocast=autocast)
    for _ in range(steps):
        step()
    with torch.no_grad():
        row_objective = module.objective
        embedding = row_objective.embeddings(module.parameter)
        activations = row_objective.position_activations(row_objective.model_input(embedding), slice(0, module.n_rows))
        objective = row_objective.objective(activations)
        token_ids, _ = nearest_tokens(embedding, module.backbone.vocab_embeddings)
    return token_ids.cpu(), objective.cpu()


def numerics_table(device: str, steps: int, compile_modes: list[str], gpu_variants: bool) -> list[str]:
    variants = {"bf16-mixed": {"precision": "bf16-mixed"}}
    if gpu_variants:
        variants["tf32 (matmul_precision=high)"] = {"matmul_precision": "high"}
        variants["16-mixed"] = {"precision": "16-mixed"}
    variants.update({f"compile_mode={m}": {"compile_mode": m} for m in compile_modes})
    ids32, obj32 = study_outcome(device, steps)
    lines = [f"{'variant':<30} {'tokens != fp32':>15} {'max rel act err':>16} {'median':>9}"]
    for name, options in variants.items():
        ids, obj = study_outcome(device, steps, **options)
        rel = ((obj.double() - obj32.double()).abs() / obj32.double().abs().clamp_min(1e-30))
        lines.append(f"{name:<30} {int((ids != ids32).sum()):>9} of {ids.numel():<3} {float(rel.max()):>16.2e} "
                     f"{float(rel.median()):>9.2e}")
        print(lines[-1], flush=True)
    return lines


# --- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    global CONFIG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case; the median is reported")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--compile", default=None,
                    help="comma-separated compile_mode values to check and time (default: none on CPU; "
                         "default,reduce-overhead,max-autotune on CUDA); 'none' for none")
    ap.add_argument("--numerics-steps", type=int, default=None,
                    help="optimizer steps of the study per numerics variant (default 500 on CUDA, 40 on CPU)")
    ap.add_argument("--atlas-chunk", type=int, default=None,
                    help="rows per forward/backward chunk of the atlas step (default: automatic, as a run does)")
    ap.add_argument("--atlas-repeats", type=int, default=None, help="default 1 on CPU, --repeats on CUDA")
    ap.add_argument("--atlas-steps", type=int, default=None, help="default 1 on CPU, --steps on CUDA")
    ap.add_argument("--skip-atlas", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a 9-layer, 96-wide GPT-2 (and a 1,024-wide ceiling matmul): a smoke run of every code path")
    ap.add_argument("--all-variants", action="store_true",
                    help="on CPU too, run the variants timed by default only on CUDA (TF32, fp16, bf16 raw and atlas)")
    args = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners between the numbers
    warnings.filterwarnings("ignore", message=".*(eval mode|LeafSpec|does not have many workers).*")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.tiny:
        CONFIG = GPT2Config(n_layer=LAYER + 1, n_embd=96, n_head=4, n_positions=32)  # wider than UNIT
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # fp32 everywhere unless a variant says otherwise
    cpu = device == "cpu"
    gpu_variants = not cpu or args.all_variants
    compile_modes = [m for m in (args.compile or ("none" if cpu else "default,reduce-overhead,max-autotune")).split(",")
                     if m and m != "none"]
    numerics_steps = args.numerics_steps or (40 if cpu else 500)
    atlas_repeats = args.atlas_repeats or (1 if cpu else args.repeats)
    atlas_steps = args.atlas_steps or (1 if cpu else args.steps)
    R, S = args.repeats, args.steps
    d, d_mlp = CONFIG.n_embd, CONFIG.n_inner or 4 * CONFIG.n_embd

    name = torch.cuda.get_device_name() if not cpu else f"CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}"
    print(f"# torch {torch.__version__}, {name}, load average at start {os.getloadavg()[0]:.2f}"
          f"{' (TINY model: smoke run, numbers mean nothing)' if args.tiny else ''}", flush=True)

    print("\n## correctness on this device", flush=True)
    run_checks(device, compile_modes)

    numerics = []
    if not args.skip_numerics:
        print(f"\n## what opt-in numerics change: {numerics_steps} steps of the 10-seed study, then decode "
              f"(vs fp32 eager)", flush=True)
        numerics = numerics_table(device, numerics_steps, compile_modes, gpu_variants)

    print("\n## timings", flush=True)
    results: dict[str, float] = {}
    mem: dict[str, tuple[float, float]] = {}
    other: dict[str, float] = {}  # CPU share other processes took while each case ran
    flops: dict[str, float] = {}
    ceiling = matmul_ceiling(device, R, 1024 if args.tiny else None)
    useful = study_flops(N_SEEDS, d=d, d_mlp=d_mlp)
    print(f"fp32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s; FLOPs per study step: {useful / 1e9:.2f} G "
          f"(fwd + input-grad bwd, {LAYER} blocks; the naive loop also runs the later blocks forward)", flush=True)

    def timed(key: str, fn, work: float, repeats: int = R, steps: int = S, warmup: int = 1) -> None:
        with peak_memory(device, mem, key):
            results[key] = median_time(fn, repeats, steps, device, warmup)
        other[key], flops[key] = FOREIGN["last"], work
        print(f"{key}: {results[key] * 1e3:.1f} ms/step", flush=True)

    timed("matmuls only", gemm_only_step(device, N_SEEDS, d=d, d_mlp=d_mlp), useful)
    model = random_gpt2(device)
    timed("naive", naive_step_fn(model, device), useful, steps=max(1, S // 2 if cpu else S))
    del model
    gc.collect()

    target = f"blocks.{LAYER}.hook_resid_pre:{UNIT}"
    module = make_module(target, device)
    timed("ours/raw", raw_step_fn(module)[0], useful)
    if gpu_variants:
        timed("ours/raw bf16", raw_step_fn(make_module(target, device), autocast=torch.bfloat16)[0], useful)
    for mode in compile_modes:
        timed(f"ours/raw {mode}", raw_step_fn(make_module(target, device, compile_mode=mode))[0], useful)
    fits = {"ours/fit": ({}, "32-true")}
    if gpu_variants:
        fits["ours/fit bf16-mixed"] = ({}, "bf16-mixed")
        fits["ours/fit tf32"] = ({"matmul_precision": "high"}, "32-true")
    fits.update({f"ours/fit {m}": ({"compile_mode": m}, "32-true") for m in compile_modes})
    for m in compile_modes[-1:] or ["none"]:  # the per-step host sync removed (issue 14's first candidate)
        fits[f"ours/fit {m} check/50"] = ({"compile_mode": m, "finite_check_every": 50}, "32-true")
    if not args.skip_fit:
        for key, (options, precision) in fits.items():
            fit_module = make_module(target, device, **options)
            with peak_memory(device, mem, key):
                with ForeignLoad() as load:
                    results[key], wall = lightning_fit(fit_module, device, S * 2, R, precision)
            other[key], flops[key] = load.value, useful
            print(f"{key}: {results[key] * 1e3:.1f} ms/step (Trainer.fit of {S * 2 + 2} steps: {wall:.2f} s wall)",
                  flush=True)
            del fit_module
            gc.collect()
    del module
    gc.collect()

    if not args.skip_atlas:
        width = d
        atlas_flops = study_flops(width * N_SEEDS, d=d, d_mlp=d_mlp)
        variants = {"atlas": (None, "none")}
        if gpu_variants:
            variants["atlas bf16"] = (torch.bfloat16, "none")
            variants.update({f"atlas bf16 {mode}": (torch.bfloat16, mode) for mode in compile_modes})
        for key, (autocast, mode) in variants.items():
            atlas = make_module(f"blocks.{LAYER}.hook_resid_pre:*", device, compile_mode=mode)
            if not args.atlas_chunk:
                atlas.row_chunks()  # the automatic chunk size, as a fit decides it at its first step
            chunk = args.atlas_chunk or atlas.chunk_rows_used
            step, chunks = raw_step_fn(atlas, chunk, autocast=autocast)
            print(f"{key}: {atlas.n_rows} rows in {len(chunks)} chunk(s) of {chunk}", flush=True)
            timed(key, step, atlas_flops, atlas_repeats, atlas_steps, warmup=0 if cpu else 1)
            del atlas, step
            gc.collect()

    naive = results["naive"]
    units = CONFIG.n_embd
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}; other% = CPU share other processes used meanwhile "
          f"(> ~5% on CPU: rerun, the numbers are contended); x naive = naive time / case time (per study step; "
          f"atlas: naive time x {units} units / atlas time); floor = useful FLOPs / fp32 square-matmul ceiling")
    if numerics:
        print("\n" + "\n".join(numerics))
    failed = [c for c in CHECKS if not c[1] <= c[2]]
    print(f"\ncorrectness checks: {len(CHECKS) - len(failed)} of {len(CHECKS)} passed"
          + "".join(f"\n  FAILED: {what}" for what, _, _ in failed))
    header = f"{'case':<24} {'ms/step':>10} {'x naive':>8} {'GFLOP':>8} {'TFLOP/s':>8} {'%ceil':>6} " \
             f"{'/floor':>7} {'peak MiB':>9} {'+MiB':>7} {'other%':>6}"
    print(header)
    print("-" * len(header))
    for key, t in results.items():
        work = flops[key]
        ratio = naive * (units if key.startswith("atlas") else 1) / t
        rate = work / t
        floor = work / ceiling
        peak, delta = mem.get(key, (float("nan"), float("nan")))
        print(f"{key:<24} {t * 1e3:>10.2f} {ratio:>8.2f} {work / 1e9:>8.1f} {rate / 1e12:>8.3f} "
              f"{100 * rate / ceiling:>5.1f}% {t / floor:>7.2f} {peak:>9.0f} {delta:>7.0f} "
              f"{100 * other.get(key, float('nan')):>5.0f}%")
    print(f"fp32 matmul ceiling {ceiling / 1e12:.3f} TFLOP/s ({name}); 500-step study: naive {naive * 500:.1f} s, "
          f"ours/fit {results.get('ours/fit', results['ours/raw']) * 500:.1f} s")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
