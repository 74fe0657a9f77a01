#!/usr/bin/env bash
# Create .venv (if missing) and install amax_lightning with its test tools into it. Safe to re-run.
#   TORCH_SPEC   the torch requirement installed first (default torch==2.13.0: on Linux, PyPI's build with
#                CUDA; on machines whose pip finds a local CPU wheel of 2.13.0, that wheel). Set it to
#                e.g. "torch>=2.4" to keep whatever torch pip would choose.
#   The Debian packages of the browser and SLURM tests come from scripts/install_system_packages.sh (root
#   with apt-get only; elsewhere those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_system_packages.sh
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
