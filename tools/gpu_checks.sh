#!/usr/bin/env bash
# The GPU checks of issue 9, as one short script for a lent GPU machine (one device):
# the gpu-marked tests (CUDA paths: fused AdamW, NCCL, bf16, flash SDPA), then the 1B preset's MFU.
# Writes $OUT/gpu_tests.log and $OUT/bench-gpu-1b.json (OUT defaults to runs/gpu-checks).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 900 python -m pytest -q -m gpu tests 2>&1 | tail -20 | tee "$OUT/gpu_tests.log"
timeout 900 python tools/benchmark.py --config configs/bench-gpu-1b.yaml --steps 10 --warmup 3 \
    --output "$OUT/bench-gpu-1b.json" 2>"$OUT/bench.err" | tail -30
