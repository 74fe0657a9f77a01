"""Side-by-side micro-measurements of candidate speed-ups for the 10-seed study step on CPU.

All variants share one random-init GPT-2 small and run interleaved (A B C ... A B C ...), medians over
repeats, so the ratios hold on a noisy machine. Nothing in src/ is changed: the candidates are written here.

    python benchmarks/explore_speedups.py --repeats 7 --steps 5 [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_study as b  # noqa: E402

from amax_lightning.model.backbone import _gpt2_attention  # noqa: E402

LAYER, UNIT = b.LAYER, b.UNIT


def gelu_tanh(x):  # same function as HF NewGELUActivation ("gelu_new"), one fused ATen kernel
    return F.gelu(x, approximate="tanh")


def residual_fast(model, x, n_blocks, fused_gelu=True, last_unit=None):
    """_gpt2_residual with fused GELU; with ``last_unit`` the last block's MLP c_proj computes only that column."""
    x = x + model.wpe.weight[: x.shape[-2]]
    blocks = list(model.h[:n_blocks])
    for i, block in enumerate(blocks):
        x = x + _gpt2_attention(block.attn, block.ln_1(x))
        act = gelu_tanh if fused_gelu else block.mlp.act
        h = act(block.mlp.c_fc(block.ln_2(x)))
        if last_unit is not None and i == len(blocks) - 1:
            proj = block.mlp.c_proj
            return x[..., last_unit] + h @ proj.weight[:, last_unit] + proj.bias[last_unit]  # (rows, tokens)
        x = x + block.mlp.c_proj(h)
    return x[..., last_unit] if last_unit is not None else x


class _PackedLinear(torch.autograd.Function):
    """y = x @ W + b with oneDNN-prepacked frozen weights; backward returns the input gradient only."""

    @staticmethod
    def forward(ctx, x, w_fwd, w_bwd, bias):
        ctx.w_bwd = w_bwd
        lin = torch.ops.mkldnn._linear_pointwise
        return lin(x.reshape(-1, x.shape[-1]), w_fwd, bias, "none", [], "").view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        lin = torch.ops.mkldnn._linear_pointwise
        gx = lin(grad.reshape(-1, grad.shape[-1]), ctx.w_bwd, None, "none", [], "")
        return gx.view(*grad.shape[:-1], -1), None, None, None


class PackedConv1D(torch.nn.Module):
    """Drop-in for HF Conv1D (x @ W + b, W of shape (in, out)) on frozen CPU weights, packed for M rows."""

    def __init__(self, conv, rows: int):
        super().__init__()
        w = conv.weight.detach()
        pack = torch.ops.mkldnn._reorder_linear_weight
        self.w_fwd = pack(w.t().contiguous(), rows)  # (out, in): y = x W^T' = x @ W
        self.w_bwd = pack(w.contiguous(), rows)  # (in, out) as a linear weight: dx = dy @ W^T
        self.bias = conv.bias.detach()
        self.weight = w  # plain (in, out) weight, for the last block's single output column

    def forward(self, x):
        return _PackedLinear.apply(x, self.w_fwd, self.w_bwd, self.bias)


def packed_model(model, rows: int, n_blocks: int):
    """A shallow copy of the first n_blocks with every Conv1D swapped for PackedConv1D (weights shared/packed)."""
    import copy

    def swapped(module, **children):  # shallow copy with its own _modules dict: the original is untouched
        clone = copy.copy(module)
        object.__setattr__(clone, "_modules", {**module._modules, **children})
        return clone

    blocks = []
    for block in model.h[:n_blocks]:
        attn = swapped(block.attn, c_attn=PackedConv1D(block.attn.c_attn, rows), c_proj=PackedConv1D(block.attn.c_proj, rows))
        mlp = swapped(block.mlp, c_fc=PackedConv1D(block.mlp.c_fc, rows), c_proj=PackedConv1D(block.mlp.c_proj, rows))
        blocks.append(swapped(block, attn=attn, mlp=mlp))
    return swapped(model, h=torch.nn.ModuleList(blocks))


def make_step(model, param, forward):
    opt = torch.optim.Adam([param], lr=b.LR)

    def step():
        opt.zero_grad()
        loss = -forward(param).mean(-1).sum()
        loss.backward()
        opt.step()

    return step


def interleaved(fns: dict, repeats: int, steps: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="add torch.compile (inductor, CPU) variants")
    ap.add_argument("--fit", action="store_true", help="add Trainer.fit per-step time (current module)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# threads {torch.get_num_threads()}, load {__import__('os').getloadavg()[0]:.2f}", flush=True)
    module = b.make_module(f"blocks.{LAYER}.hook_resid_pre:{UNIT}", "cpu")
    model = module.backbone.model
    init = module.parameter.detach().clone()
    p = lambda: init.clone().requires_grad_(True)  # noqa: E731

    mod_step, _ = b.raw_step_fn(module)
    fns = {
        "module (now)": mod_step,
        "fused gelu": make_step(model, p(), lambda e: residual_fast(model, e, LAYER)[..., UNIT]),
        "fused gelu + last col": make_step(model, p(), lambda e: residual_fast(model, e, LAYER, last_unit=UNIT)),
    }
    floor = b.median_time(b.gemm_only_step("cpu", b.N_SEEDS), args.repeats, args.steps, "cpu")
    try:
        pm = packed_model(model, b.N_SEEDS * b.N_TOKENS, LAYER)
        fast = lambda e: residual_fast(pm, e, LAYER, last_unit=UNIT)  # noqa: E731
        want = module.position_activations(init, module.row_units)
        got = fast(init)
        print(f"oneDNN packed path max |diff| vs module: {float((want - got).abs().max()):.2e}", flush=True)
        fns["oneDNN packed + gelu + col"] = make_step(pm, p(), fast)
    except Exception as exc:  # noqa: BLE001
        print("oneDNN packed path unavailable:", exc)

    if args.compile:
        torch._dynamo.config.cache_size_limit = 64
        for name, fwd in {
            "compile fwd (module path)": lambda e: module.position_activations(e, module.row_units),
            "compile fwd (fused gelu+col)": lambda e: residual_fast(model, e, LAYER, last_unit=UNIT),
        }.items():
            cf = torch.compile(fwd)
            param = p()
            start = time.perf_counter()
            step = make_step(model, param, cf)
            step()
            print(f"{name}: first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
            fns[name] = step
    naive_model = b.random_gpt2("cpu")
    fns["naive (notebook loop)"] = b.naive_step_fn(naive_model, "cpu")
    with b.ForeignLoad() as load:
        res = interleaved(fns, args.repeats, args.steps)
    res["gemm floor (matmuls only)"] = floor
    if args.fit:  # interleaved: raw step, fit, fit without _end_step (14 self.log keys + history), per repeat
        fit_times = {"raw (again)": [], "Trainer.fit (now)": [], "Trainer.fit, no _end_step": []}
        log_step = module._end_step
        for _ in range(args.repeats):
            fit_times["raw (again)"].append(interleaved({"r": mod_step}, 1, args.steps)["r"])
            fit_times["Trainer.fit (now)"].append(b.lightning_fit(module, "cpu", args.steps, 1)[0])
            module._end_step = lambda *a: None
            fit_times["Trainer.fit, no _end_step"].append(b.lightning_fit(module, "cpu", args.steps, 1)[0])
            module._end_step = log_step
        res.update({k: statistics.median(v) for k, v in fit_times.items()})
    flops = b.study_flops(b.N_SEEDS)
    base = res["module (now)"]
    print(f"# other processes used {100 * load.value:.0f}% of the CPUs during the interleaved runs")
    naive = res["naive (notebook loop)"]
    ceiling = b.matmul_ceiling("cpu", 5)
    print(f"# square fp32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s -> FLOP floor {flops / ceiling * 1e3:.1f} ms")
    print(f"{'variant':<32} {'ms/step':>8} {'vs now':>7} {'x naive':>8} {'/floor':>7} {'GFLOP/s':>8}")
    for k, t in res.items():
        print(f"{k:<32} {t * 1e3:>8.1f} {base / t:>7.2f} {naive / t:>8.2f} {t * ceiling / flops:>7.2f} "
              f"{flops / t / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
