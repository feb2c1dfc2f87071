#!/usr/bin/env bash
# TerraMind-base training and tiled inference at bf16 (and fp32 for comparison) on one CUDA GPU.
# Writes it/s and peak memory to reports/bench/gpu-<time>.json. Without CUDA it says so and exits with 2.
# Options go to `python -m workbench.bench.gpu` (see --help); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m workbench.bench.gpu "$@"
