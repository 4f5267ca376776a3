"""tools/benchmark.py on the tiny config (CPU), and the GPU path where CUDA exists."""

import json
import subprocess
import sys

import pytest
import torch

from megalm.testing.runs import REPO, TINY, train_env


def run_benchmark(*args: str, timeout: float = 600) -> dict:
    r = subprocess.run([sys.executable, "tools/benchmark.py", *args], cwd=REPO, env=train_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_benchmark_reports_throughput_mfu_and_hf_ratio():
    out = run_benchmark("--config", TINY, "--steps", "3", "--warmup", "1", "--compare-hf", "eager",
                        "--peak-tflops", "1.0", "train.precision=bf16")
    assert out["steps"] == 3 and out["tokens_per_s"] > 0
    assert out["tokens_per_s"] == pytest.approx(4 * 64 / out["median_step_s"])
    assert out["mfu"] == pytest.approx(out["tflops"] / 1.0) and out["mfu_megatron"] > out["mfu"]
    assert out["peak_source"] == "given or datasheet"
    assert 0 <= out["data_wait_fraction"] < 0.02  # synthetic batches never stall the step
    assert out["speedup_vs_hf"] == pytest.approx(out["hf"]["median_step_s"] / out["median_step_s"])


def test_benchmark_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "tools/benchmark.py", "--steps", "0"], cwd=REPO, env=train_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --steps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_bf16_fused_adam_flash_sdpa():
    # FusedAdam, NCCL, bf16 and the flash SDPA kernel on one GPU; MFU against the datasheet peak
    out = run_benchmark("--config", str(REPO / "configs" / "llama-1b.yaml"), "--steps", "5", "--warmup", "3",
                        "parallel.tensor=1", "parallel.pipeline=1", "zero.stage=1", "train.micro_batch_size=4",
                        "train.global_batch_size=4", "model.activation_checkpointing=false", "train.compile=true",
                        timeout=1800)
    assert out["peak_source"] == "given or datasheet" and out["mfu"] > 0.2
