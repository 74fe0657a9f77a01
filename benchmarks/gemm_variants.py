"""The study's matmuls only (8 blocks, forward + input-grad, M = 50 rows): MKL vs oneDNN packed, cold vs hot weights.

    python benchmarks/gemm_variants.py [--threads N]
"""
import argparse
import statistics
import time

import torch

ap = argparse.ArgumentParser(); ap.add_argument("--threads", type=int, default=0); ap.add_argument("--m", type=int, default=50)
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
d, dm, M, L = 768, 3072, args.m, 8
shapes = [(d, 3 * d), (d, d), (d, dm), (dm, d)]
cold = [[torch.randn(k, n) for k, n in shapes] for _ in range(L)]  # Conv1D layout (in, out), 227 MB in all
hot = [cold[0]] * L  # one block's 28 MB reused: stays in cache
xs = {k: torch.randn(M, k) for k in (d, dm)}
gs = {n: torch.randn(M, n) for n in (d, 3 * d, dm)}

def mkl(ws):
    def run():
        for blk in ws:
            for w in blk: xs[w.shape[0]] @ w
        for blk in reversed(ws):
            for w in reversed(blk): gs[w.shape[1]] @ w.T
    return run

def onednn(ws):  # weights prepacked once for oneDNN (fwd: W^T as (out,in); bwd: W as (in,out))
    pk = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, M)
    fw = [[(w.shape[0], pk(w.t().contiguous())) for w in blk] for blk in ws]
    bw = [[(w.shape[1], pk(w.contiguous())) for w in blk] for blk in ws]
    lin = torch.ops.mkldnn._linear_pointwise
    def run():
        for blk in fw:
            for k, w in blk: lin(xs[k], w, None, "none", [], "")
        for blk in reversed(bw):
            for n, w in reversed(blk): lin(gs[n], w, None, "none", [], "")
    return run

def t(f, n=9, s=5):
    f(); ts = []
    for _ in range(n):
        a = time.perf_counter()
        for _ in range(s): f()
        ts.append((time.perf_counter() - a) / s)
    return statistics.median(ts)

flops = 2 * 2 * M * L * sum(k * n for k, n in shapes)
fns = {"mkl cold": mkl(cold), "mkl hot": mkl(hot)}
try:
    fns["onednn packed cold"] = onednn(cold); fns["onednn packed hot"] = onednn(hot)
except Exception as e:
    print("onednn packed unavailable:", e)
res = {k: [] for k in fns}
for _ in range(3):
    for k, f in fns.items(): res[k].append(t(f, 3))
print(f"threads {torch.get_num_threads()}, M={M}, {flops/1e9:.2f} GFLOP")
for k, v in res.items():
    m = statistics.median(v); print(f"{k:<20} {m*1e3:7.1f} ms {flops/m/1e9:7.1f} GFLOP/s")
