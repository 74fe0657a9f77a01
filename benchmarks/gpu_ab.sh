#!/usr/bin/env bash
# A/B on the card: the study's step before (commit 40cd3f7, carried in .ab_old) and after the restructuring,
# alternating, same flags; timings only (the correctness checks run in each). Carry .whl and .ab_old.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
flags="--device cuda --repeats 5 --steps 20 --compile reduce-overhead --skip-numerics --skip-atlas"
for round in 1 2; do
  echo "### round $round: before"; timeout 150 python3 .ab_old/benchmarks/bench_study.py $flags 2>&1 | tail -14 | tee -a "$OUT/ab.log"
  echo "### round $round: after"; timeout 150 python3 benchmarks/bench_study.py $flags 2>&1 | tail -14 | tee -a "$OUT/ab.log"
done
