#!/usr/bin/env bash
# The token-search device check, one call: sequences scored per second against the per-seed loop, then the
# methods study (continuous, straight_through, gcg, epo x two targets) on a random-weight GPT-2 small. Carry .whl
# (jsonargparse and its two needs, which the device image lacks). Logs and the study's tables go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:src || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 benchmarks/token_search_speed.py --device cuda --steps 5 2>&1 | grep -v Warn | tee "$OUT/speed.log"
timeout ${STUDY_TIMEOUT:-330} python3 benchmarks/methods_study_run.py --out /tmp/methods --trainer.accelerator gpu \
  --trainer.enable_progress_bar false "$@" 2>&1 | grep -v Warn | tail -40 | tee "$OUT/methods.log"
mkdir -p "$OUT/methods" && cp /tmp/methods/studies/version_0/study.* "$OUT/methods/" 2>/dev/null
for f in /tmp/methods/lightning_logs/version_*/results.json; do
  v=$(basename "$(dirname "$f")"); cp "$f" "$OUT/methods/$v.results.json"; done
