"""The benchmark script that GPU sessions run: every code path works (tiny model, CPU), its checks pass."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_benchmark_smoke_run_passes_its_checks_and_prints_every_case(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_study.py"), "--tiny", "--repeats", "1", "--steps", "1",
         "--numerics-steps", "2", "--compile", "none", "--all-variants"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "correctness checks: 4 of 4 passed" in proc.stdout
    table = proc.stdout[proc.stdout.index("case "):]
    for case in ("matmuls only", "naive", "ours/raw", "ours/raw bf16", "ours/fit", "ours/fit bf16-mixed",
                 "ours/fit tf32", "atlas", "atlas bf16"):
        assert f"\n{case} " in table, case
    for variant in ("bf16-mixed", "tf32 (matmul_precision=high)", "16-mixed"):
        assert f"\n{variant} " in proc.stdout and "of 50" in proc.stdout
