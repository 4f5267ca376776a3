#!/usr/bin/env bash
# The GPU check of issue 9 as one short script for a lent GPU machine (one device): the one-GPU 1B
# preset through the whole engine (CUDA paths: fused AdamW, NCCL, bf16, flash SDPA, torch.compile,
# the fused loss), printing MFU against the datasheet peak; the same run as the gpu-marked test.
# The device image lacks DeepSpeed: make wheels here first (bash tools/gpu_wheels.sh) and carry
# .whl; they are installed to /tmp/site. Writes $OUT/{gpu.txt,bench-gpu-1b.json,bench.err}.
# With the device tool: run(command="OUT=$OUT bash tools/gpu_checks.sh", carry=[".whl"], timeout_s=480)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 "$PY" tools/benchmark.py --config configs/bench-gpu-1b.yaml --steps 10 --warmup 3 \
    --output "$OUT/bench-gpu-1b.json" 2>"$OUT/bench.err" | tail -30
# document masking's GPU kernel (compiled FlexAttention with the block mask) against the dense mask
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/long_context/test_documents.py -m gpu 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
