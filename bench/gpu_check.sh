#!/usr/bin/env bash
# The one prepared script for a GPU machine (a few minutes): GPU-only tests, kernel timings,
# and an end-to-end lookahead generation on the GPU. Figures go to $OUT (or bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 240 "$(dirname "$PY")/pytest" -q -m gpu tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 200 "$PY" bench/triton_kernels.py --reps 20 2>&1 | tee "$OUT/kernels.txt"
timeout 200 "$PY" bench/decoding.py --workloads code_edit,open_ended --num-prompts 2 --max-new-tokens 128 \
    --output-json "$OUT/decoding_gpu.json" 2>&1 | tail -40 | tee "$OUT/decoding_gpu.txt"
