#!/usr/bin/env bash
# The GPU checks (issue 26) as one short script for a lent one-GPU machine, most important first,
# each step under its own time limit so that what ran comes back even if a later step hangs:
#   1. nvidia-smi and the versions                                          -> gpu.txt
#   2. the 1B preset (configs/bench-gpu-1b.yaml), compiled, through the whole engine (fused AdamW,
#      NCCL, bf16, flash SDPA, torch.compile, the fused chunked loss): tokens/s, TFLOP/s, MFU in both
#      conventions, peak memory, data wait; then one step under torch.profiler (top kernels)
#                                                                           -> bench-1b.json, bench-1b.log
#   3. the gpu-marked tests: a bf16 tiny run on the device with sync and async saves, resume, to-hf and
#      KV-cache generation (tests/test_gpu.py); compiled FlexAttention's document mask against SDPA's
#      (the 1B test of tests/test_benchmark.py is step 2 already)        -> pytest.txt
#   4. the same 1B shape uncompiled, interleaved step by step with transformers' LlamaForCausalLM
#      (bf16, torch.compile'd): the "compile" before/after row and the ratio to transformers
#                                                                           -> bench-1b-eager-hf.json, .log
# The device image lacks DeepSpeed and has an older transformers: make wheels here first
# (bash tools/gpu_wheels.sh) and carry .whl; they are installed to /tmp/site.
# With the device tool: run(command="bash tools/gpu_checks.sh", carry=[".whl"], timeout_s=540)
# Elsewhere: OUT=runs/gpu-checks bash tools/gpu_checks.sh; STEPS=benchmark,tests,hf picks steps 2-4;
# STEPS=...,variant VARIANT="train.global_batch_size=32" adds the compiled 1B run with those overrides;
# STEPS=...,qwen3 a 1B-sized Qwen3 shape against transformers' Qwen3ForCausalLM (issue 22);
# STEPS=...,moe a Qwen3-MoE shape (8 experts, top-2: torch._grouped_mm on the GPU) against transformers'
# Qwen3MoeForCausalLM (issue 23).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
STEPS=${STEPS:-benchmark,tests,hf}
CONFIG=${CONFIG:-configs/bench-gpu-1b.yaml}  # CONFIG=configs/tiny.yaml tries the script on a CPU
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | grep -v "WARNING: Target directory" || true
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/gpu.txt"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/gpu.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import torch, triton, deepspeed, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "triton", triton.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "nccl", torch.cuda.nccl.version())
EOF

summary() {  # one line of a benchmark's JSON
    "$PY" - "$1" <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {d['tokens_per_s']:,.0f} tokens/s, step {d['median_step_s']*1e3:.1f} ms, "
      f"{d['tflops']:.0f} TFLOP/s, MFU {d['mfu']:.3f} (Megatron {d['mfu_megatron']:.3f}), "
      f"peak {d['peak_mem_gib']:.1f} GiB, data wait {d['data_wait_fraction']:.4f}, loss {d['final_loss']:.3f}")
if "hf" in d:
    h = d["hf"]
    print(f"  transformers ({h['variant']}, {h['precision']}): {h['tokens_per_s']:,.0f} tokens/s, "
          f"step {h['median_step_s']*1e3:.1f} ms, loss {h['final_loss']:.3f}")
p = d.get("profile")
if p and "top" in p:
    print(f"  profiled step: wall {p['wall_ms']:.1f} ms, kernels {p['kernel_ms']:.1f} ms (busy {p['busy_fraction']:.2f})")
    print("  kinds: " + ", ".join(f"{k} {v:.3f}" for k, v in p["kinds"].items()))
    for k in p["top"]:
        print(f"  {k['fraction']:.3f} {k['ms']:8.2f} ms x{k['calls']:<4} {k['name'][:110]}")
EOF
}

if [[ $STEPS == *benchmark* ]]; then
    log "1B preset, compiled, with a profiled step"
    timeout 210 "$PY" tools/benchmark.py --config "$CONFIG" --steps 8 --warmup 3 --profile \
        --output "$OUT/bench-1b.json" >/dev/null 2>"$OUT/bench-1b.log"
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    [ -s "$OUT/bench-1b.json" ] && summary "$OUT/bench-1b.json" || tail -25 "$OUT/bench-1b.log"
fi

if [[ $STEPS == *tests* ]]; then
    log "gpu-marked tests"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k "not fused_adam_flash_sdpa" \
        tests/test_gpu.py tests/long_context/test_documents.py tests/test_benchmark.py >"$OUT/pytest.txt" 2>&1
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    tail -40 "$OUT/pytest.txt"
    grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -1 >>"$OUT/gpu.txt"
fi

if [[ $STEPS == *hf* ]]; then
    log "1B preset uncompiled, beside transformers' Llama compiled"
    timeout 150 "$PY" tools/benchmark.py --config "$CONFIG" --steps 5 --warmup 2 \
        --compare-hf compiled --output "$OUT/bench-1b-eager-hf.json" train.compile=false \
        >/dev/null 2>"$OUT/bench-1b-eager-hf.log"
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    [ -s "$OUT/bench-1b-eager-hf.json" ] && summary "$OUT/bench-1b-eager-hf.json" || tail -25 "$OUT/bench-1b-eager-hf.log"
fi
if [[ $STEPS == *variant* ]]; then  # VARIANT="key=value ...": the compiled 1B run with a change (an after row)
    log "1B preset, compiled, with ${VARIANT:-no change}"
    timeout 180 "$PY" tools/benchmark.py --config "$CONFIG" --steps 6 --warmup 2 --profile \
        --output "$OUT/bench-1b-variant.json" ${VARIANT:-} >/dev/null 2>"$OUT/bench-1b-variant.log"
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    [ -s "$OUT/bench-1b-variant.json" ] && summary "$OUT/bench-1b-variant.json" || tail -25 "$OUT/bench-1b-variant.log"
fi
if [[ $STEPS == *qwen3* ]]; then  # issue 22: a Qwen3 shape against transformers' own Qwen3ForCausalLM
    log "1B-sized Qwen3 shape (qk-norm, 16 heads x 128, GQA 2:1), compiled, beside transformers' Qwen3 compiled"
    timeout 180 "$PY" tools/benchmark.py --config "$CONFIG" --steps 5 --warmup 2 --compare-hf compiled \
        --output "$OUT/bench-qwen3-hf.json" model.family=qwen3 model.qk_norm=true model.num_heads=16 \
        model.num_kv_heads=8 model.head_dim=128 >/dev/null 2>"$OUT/bench-qwen3-hf.log"
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    [ -s "$OUT/bench-qwen3-hf.json" ] && summary "$OUT/bench-qwen3-hf.json" || tail -25 "$OUT/bench-qwen3-hf.log"
fi
if [[ $STEPS == *moe* ]]; then  # issue 23: the grouped-matmul experts against transformers' own Qwen3-MoE
    log "1.5B Qwen3-MoE shape (8 experts of 1024, top-2, qk-norm), compiled, beside transformers' Qwen3-MoE compiled"
    timeout 180 "$PY" tools/benchmark.py --config "$CONFIG" --steps 5 --warmup 2 --compare-hf compiled --profile \
        --output "$OUT/bench-moe-hf.json" model.family=qwen3_moe model.qk_norm=true model.num_heads=16 \
        model.num_kv_heads=8 model.head_dim=128 model.moe_num_experts=8 model.moe_top_k=2 \
        model.moe_ffn_hidden_size=1024 train.micro_batch_size=4 train.global_batch_size=4 \
        >/dev/null 2>"$OUT/bench-moe-hf.log"
    echo "rc=$?" | tee -a "$OUT/gpu.txt"
    [ -s "$OUT/bench-moe-hf.json" ] && summary "$OUT/bench-moe-hf.json" || tail -25 "$OUT/bench-moe-hf.log"
fi
log "done"
