#!/usr/bin/env bash
# The device check, one call: the refactored step on the card (correctness, then timings, bench_study.py), and
# the SAE study at GPT-2 small's shape through the real CLI. Carry .whl (jsonargparse and its two needs, which
# the device image lacks). Writes logs to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
timeout 300 python3 benchmarks/bench_study.py --device cuda --repeats 3 --steps 20 --compile reduce-overhead \
  --numerics-steps 100 --atlas-repeats 2 --atlas-steps 3 2>&1 | tee "$OUT/bench.log"
timeout 150 python3 benchmarks/sae_shape_run.py --latents top8@91 --trainer.accelerator gpu 2>&1 | tee "$OUT/sae.log"
