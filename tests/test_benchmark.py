"""tools/benchmark.py on the tiny config (CPU), and the GPU path where CUDA exists."""

import json
import subprocess
import sys

import pytest
import torch

from megalm.testing.runs import REPO, TINY, gpu_env, train_env


def run_benchmark(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> dict:
    r = subprocess.run([sys.executable, "tools/benchmark.py", *args], cwd=REPO, env=env or train_env(),
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
    assert 0 <= out["data_wait_fraction"] < 1  # a fraction of the step time (the figure: README, Performance)
    assert out["optimizer"]["name"] == "adamw" and 0 < out["optimizer"]["fraction_of_step"] < 1
    assert out["speedup_vs_hf"] == pytest.approx(out["hf"]["median_step_s"] / out["median_step_s"])
    assert out["hf"]["precision"] == "bf16" and out["hf"]["variant"] == "eager"
    # both models train on the same random tokens from a random init: loss near ln(257) = 5.55
    assert abs(out["hf"]["final_loss"] - 5.55) < 0.5 and abs(out["final_loss"] - 5.55) < 0.5


def test_benchmark_times_the_optimizer_step():
    # issue 24: the torch optimizer's step (Muon's Newton-Schulz and gathers) as a share of the step
    out = run_benchmark("--config", TINY, "--steps", "3", "--warmup", "1", "optimizer.name=muon", "zero.stage=0")
    opt = out["optimizer"]
    assert opt["name"] == "muon" and 0 < opt["fraction_of_step"] < 1
    assert opt["median_step_s"] < out["median_step_s"]


def test_benchmark_compares_a_qwen3_shape_with_transformers_qwen3():
    # issue 22: --compare-hf trains the family's own class (Qwen3ForCausalLM: qk-norm, head_dim 32)
    out = run_benchmark("--config", TINY, "--steps", "2", "--warmup", "1", "--compare-hf", "eager",
                        "model.family=qwen3", "model.qk_norm=true", "model.head_dim=32")
    assert out["hf"]["class"] == "Qwen3ForCausalLM" and out["speedup_vs_hf"] > 0
    assert abs(out["hf"]["final_loss"] - 5.55) < 0.5 and abs(out["final_loss"] - 5.55) < 0.5


def test_benchmark_compares_a_moe_shape_with_transformers_qwen3_moe():
    # issue 23: configs/moe-tiny.yaml against Qwen3MoeForCausalLM; MFU on active parameters
    from megalm.config import load_config
    from megalm.model.flops import count_parameters, flops_per_token_palm

    out = run_benchmark("--config", str(REPO / "configs" / "moe-tiny.yaml"), "--steps", "2", "--warmup", "1",
                        "--compare-hf", "eager", "--peak-tflops", "1.0")
    assert out["hf"]["class"] == "Qwen3MoeForCausalLM" and out["speedup_vs_hf"] > 0
    assert abs(out["hf"]["final_loss"] - 5.55) < 0.5 and abs(out["final_loss"] - 5.55) < 0.5
    model = load_config(REPO / "configs" / "moe-tiny.yaml").model
    assert out["tflops"] == pytest.approx(out["tokens_per_s"] * flops_per_token_palm(model, 64) / 1e12, rel=1e-6)
    assert flops_per_token_palm(model, 64) < 6 * count_parameters(model, embeddings=False)  # k of E experts count


def test_benchmark_on_real_shards(byte_shards, tmp_path):
    # the trainer's pipeline (sample index, a DataLoader worker) on a model with ~0.2 s steps
    out = run_benchmark("--config", TINY, "--steps", "8", "--warmup", "2", f"data.train_prefixes=[{byte_shards}]",
                        f"train.run_dir={tmp_path}", "data.num_workers=1", "model.hidden_size=256",
                        "model.num_layers=4", "model.ffn_hidden_size=704", "model.max_seq_len=256",
                        "data.seq_len=256", "train.steps=2")
    assert out["data"] == "shards" and out["steps"] == 8
    assert 0 <= out["data_wait_fraction"] < 1, out  # measured, not asserted: README, Performance
    assert out["final_loss"] < 5.0  # real text is learnable within ten steps, random bytes are not


def test_benchmark_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "tools/benchmark.py", "--steps", "0"], cwd=REPO, env=train_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --steps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_bf16_fused_adam_flash_sdpa():
    # fused AdamW, NCCL, bf16 and the flash SDPA kernel on one GPU; MFU against the datasheet peak
    out = run_benchmark("--config", str(REPO / "configs" / "bench-gpu-1b.yaml"), "--steps", "5", "--warmup", "3",
                        timeout=1800, env=gpu_env())
    assert out["peak_source"] == "given or datasheet" and 0 < out["mfu"] < out["mfu_megatron"] < 1
