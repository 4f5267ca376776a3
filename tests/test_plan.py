"""The planner: ZeRO arithmetic, activations against Megatron's formula, FLOPs, the CLI, and its
model-state bytes against what a real DeepSpeed engine allocates for the tiny config on CPU."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.config import ModelConfig, load_config
from megalm.model.flops import count_parameters, flops_per_token_megatron, flops_per_token_palm
from megalm.perf.plan import (
    activation_bytes_per_token,
    head_bytes,
    layer_parameters,
    make_plan,
    model_state_bytes,
    partition_stages,
)
from megalm.testing.distributed import run_distributed_test
from megalm.testing.memory import measure_cases

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_zero_stages_bf16():
    # 2 + 2 + 12 bytes per parameter, divided by N = 8 as ZeRO shards them
    got = [model_state_bytes(1000, "bf16", z, 8) for z in range(4)]
    assert [(s.params, s.grads, s.optimizer) for s in got] == [
        (2000, 2000, 12000), (2000, 2000, 1500), (2000, 250, 1500), (250, 250, 1500)]


def test_fp32_zero0_has_no_separate_master_copy():
    assert model_state_bytes(1000, "fp32", 0, 1).optimizer == 8000  # Adam m, v
    assert model_state_bytes(1000, "fp32", 1, 1).optimizer == 12000  # DeepSpeed's fp32 partition too


def test_gpt2_activations_are_megatrons_34_sbh_without_the_attention_matrix():
    cfg = ModelConfig(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257)
    assert activation_bytes_per_token(cfg, "bf16", 1, False) == 34 * 768
    # tensor parallel: norms and the two matmul inputs stay whole, the rest is split over t
    assert activation_bytes_per_token(cfg, "bf16", 4, False) == (8 + 26 / 4) * 768
    assert activation_bytes_per_token(cfg, "bf16", 4, True) == (4 + 30 / 4) * 768


def test_llama_7b_on_8_gpus():
    cfg = load_config(ROOT / "configs" / "llama-7b.yaml")
    plan = make_plan(cfg, 8, mfu=0.5, peak_tflops=1000.0)
    n = 6_738_415_616  # vocabulary 32000 is a multiple of 64: no padding
    assert (plan.data, plan.rank_parameters, plan.parameters) == (8, n, n)
    assert plan.zero[1].params == 2 * n and plan.zero[1].optimizer == 12 * n // 8
    assert plan.tokens_per_step == 1024 * 4096
    assert plan.flops_per_step_palm == flops_per_token_palm(cfg.model, 4096) * 1024 * 4096
    assert plan.flops_per_step_megatron == flops_per_token_megatron(cfg.model, 4096, recompute=True) * 1024 * 4096
    assert plan.step_seconds == pytest.approx(plan.flops_per_step_palm / (8 * 1000e12 * 0.5))
    # checkpointing keeps 2 s b d bytes per block plus one recomputed block and the head
    assert plan.activations_ckpt < plan.activations_no_ckpt / 5


def test_llama_70b_pipeline_stages_cover_the_model():
    cfg = load_config(ROOT / "configs" / "llama-70b.yaml").validate(64)
    weights = layer_parameters(cfg.model, 8, 4)
    stages = partition_stages(weights, 4, "parameters")
    assert [i for r in stages for i in r] == list(range(len(weights)))
    assert [sum(1 for i in r if 1 <= i <= 80) for r in stages] == [20, 20, 20, 20]
    # each tensor rank holds 1/8 of the matmuls and embeddings and all of the norms; the vocabulary
    # is padded to a multiple of 64 x 8: 32256 rows in the embedding and in the head
    norms, padding = 80 * 2 * 8192 + 8192, (32256 - 32000) * 8192 * 2
    assert 8 * (sum(weights) - norms) + norms - padding == count_parameters(cfg.model)
    plan = make_plan(cfg, 64)
    assert not plan.zero[2].allowed and plan.zero[1].allowed


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_json_and_table():
    out = _run_cli("--config", "configs/llama-1b.yaml", "--gpus", "8", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["parameters"] == 1_100_048_384 and plan["zero_stage"] == 1
    assert plan["rank_bytes"] == plan["zero"][1]["rank_bytes"]
    table = _run_cli("--config", "configs/llama-1b.yaml", "--gpus", "16", "train.micro_batch_size=4")
    assert table.returncode == 0 and "DP16" in table.stdout and "<- this run" in table.stdout


@pytest.mark.parametrize("gpus", ["7", "0"])
def test_cli_bad_gpu_count_is_one_line_and_exit_2(gpus: str):
    out = _run_cli("--config", "configs/llama-7b.yaml", "--gpus", gpus)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr


# Planner vs DeepSpeed on CPU. Accumulation 2, so the measured backward is not at a boundary and
# the full gradients exist (see megalm.testing.memory). Tolerance: 0.1% per category; the
# differences are Adam's 4-byte `step` tensors and flat-buffer alignment.
BASE = ["checkpoint.load=none", "logging.console=false", "logging.tensorboard=false", "train.micro_batch_size=2"]
CASES = {
    1: [["zero.stage=0", "train.precision=fp32"], ["zero.stage=1", "train.precision=fp32"],
        ["zero.stage=0", "train.precision=bf16"], ["zero.stage=1", "train.precision=bf16"]],
    2: [["zero.stage=1", "train.precision=fp32"], ["zero.stage=1", "train.precision=bf16"],
        ["zero.stage=1", "train.precision=fp32", "parallel.tensor=2"],
        ["zero.stage=1", "train.precision=bf16", "parallel.context=2"],  # ZeRO partitions over context too
        ["zero.stage=2", "train.precision=fp32", "optimizer.name=muon", "parallel.tensor=2"]],
}
# Muon: its matrices keep one state (momentum) where Adam keeps two
CASES[1] += [[*c, "optimizer.name=muon"] for c in CASES[1]]
CASES[2] += [["zero.stage=1", "train.precision=bf16", "optimizer.name=muon"]]


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_model_state_bytes_match_deepspeed(world_size: int):
    cases = [[*BASE, *c, f"train.global_batch_size={4 * world_size}"] for c in CASES[world_size]]
    measured = run_distributed_test(measure_cases, world_size, args=(TINY, cases), timeout=600,
                                    env={"DS_ACCELERATOR": "cpu"})
    for i, overrides in enumerate(cases):
        plan = make_plan(load_config(TINY, overrides), world_size)
        zero = plan.zero[plan.zero_stage]
        for rank_values in measured:
            got = rank_values[i]
            for key in ("params", "grads", "optimizer"):
                planned = getattr(zero, key)
                assert got[key] == pytest.approx(planned, rel=1e-3), (overrides, key, got, planned)


def test_expert_parallel_model_states_match_deepspeed():
    # moe-tiny at EP2 over data 2: the routed experts are halved per rank and ZeRO partitions their
    # states over the ranks holding the same experts (here one), the dense ones over both
    moe = str(ROOT / "configs" / "moe-tiny.yaml")
    cases = [[*BASE, f"zero.stage={z}", "train.precision=fp32", "parallel.expert=2", "model.family=none",
              "train.global_batch_size=8", *muon] for z in (0, 1)  # as above: measure_rank reads ZeRO 0 and 1
             for muon in ([], ["optimizer.name=muon"])]
    measured = run_distributed_test(measure_cases, 2, args=(moe, cases), timeout=600, env={"DS_ACCELERATOR": "cpu"})
    for i, overrides in enumerate(cases):
        plan = make_plan(load_config(moe, overrides), 2)
        assert plan.rank_expert_parameters * 2 == make_plan(load_config(moe, [*overrides, "parallel.expert=1"]), 2
                                                            ).rank_expert_parameters
        assert plan.all_to_all_bytes > 0
        zero = plan.zero[plan.zero_stage]
        for rank_values in measured:
            for key in ("params", "grads", "optimizer"):
                assert rank_values[i][key] == pytest.approx(getattr(zero, key), rel=1e-3), (overrides, key, rank_values[i])


def _saved_bytes_per_token(arch: str, precision: str, checkpointing: bool, context: bool = False) -> tuple[float, object]:
    """Bytes autograd saves for backward in one real Block's forward, per token of this rank
    (parameters excluded); `context`: the block of a context-parallel rank (all ranks call it)."""
    import torch.distributed as dist

    from megalm.config import load_config
    from megalm.model.gpt import Block
    from megalm.parallel.checkpointing import apply_activation_checkpointing
    from megalm.parallel.context import TensorParallel

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.arch={arch}",
                                                       f"model.activation_checkpointing={str(checkpointing).lower()}"])
    m = cfg.validate(1).model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    tp = TensorParallel.build(None, seed=1, context=dist.new_group([0, 1]) if context else None)
    block = Block(m, 0, tp).to(dtype).train()
    if checkpointing:  # as GPT and the pipeline apply it
        apply_activation_checkpointing([block], tp.rng)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, s = 2, 64
    x = torch.randn(b, s, m.hidden_size, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(saved.values()) / (b * s), m


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_formula_matches_saved_tensors_of_a_real_block(arch, precision):
    from megalm.perf.plan import activation_bytes_per_token

    measured, m = _saved_bytes_per_token(arch, precision, checkpointing=False)
    planned = activation_bytes_per_token(m, precision, 1, False)
    assert abs(measured - planned) / measured < 0.10, (measured, planned)  # measured here: 1-7% above
    # with activation checkpointing a block keeps only its input until the backward recomputes it
    measured_ckpt, _ = _saved_bytes_per_token(arch, precision, checkpointing=True)
    assert measured_ckpt == {"fp32": 4, "bf16": 2}[precision] * m.hidden_size


def _context_rank_saved_bytes() -> float:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return _saved_bytes_per_token("llama", "bf16", checkpointing=False, context=True)[0]


def test_activation_formula_holds_per_token_of_a_context_parallel_rank():
    # Ulysses keeps the same bytes per token of the rank's chunk: q, k, v whole-sequence with heads / C
    from megalm.perf.plan import activation_bytes_per_token

    measured = run_distributed_test(_context_rank_saved_bytes, 2, env={"DS_ACCELERATOR": "cpu"})
    one, m = _saved_bytes_per_token("llama", "bf16", checkpointing=False)
    planned = activation_bytes_per_token(m, "bf16", 1, False)
    for got in measured:
        assert abs(got - planned) / got < 0.10 and abs(got - one) / one < 0.05, (got, one, planned)


def test_fused_loss_holds_one_chunk_of_logits_not_the_micro_batch():
    m = load_config(ROOT / "configs" / "llama-7b.yaml").model
    tokens = 4 * 4096
    unfused = head_bytes(dataclasses.replace(m, loss_chunk_tokens=0), "bf16", 1, False, tokens)
    fused = head_bytes(m, "bf16", 1, False, tokens)
    assert unfused == (4 * 4096 + 2 * 4096 + 6 * 32000) * tokens  # the logits and their fp32 softmax
    chunk = m.loss_chunk_tokens
    assert fused == (4 * 4096 + 4 * 4096) * tokens + 10 * 32000 * chunk + 4 * 32000 * 4096
    assert fused < unfused / 2


def test_context_parallel_divides_activations_and_shards_zero_over_data_x_context():
    from megalm.perf.plan import stage_activations

    def cfg(*extra):
        return load_config(ROOT / "configs" / "llama-7b.yaml", ["model.activation_checkpointing=false",
                                                                "zero.stage=2", *extra])

    one, four = make_plan(cfg(), 2), make_plan(cfg("parallel.context=4"), 8)
    assert (four.data, four.context) == (2, 4)
    blocks = [stage_activations(c.validate(w), 32, 1, False, False) for c, w in ((cfg(), 2), (cfg("parallel.context=4"), 8))]
    assert blocks[0] == 4 * blocks[1]  # a rank holds a quarter of every sequence
    assert one.activations / 4 < four.activations < one.activations / 4 * 1.1  # + the head's weight gradient
    assert four.zero[2].optimizer == pytest.approx(one.zero[2].optimizer / 4, rel=1e-3)  # 8 shards, not 2
    assert four.zero[2].params == one.zero[2].params


def test_document_mask_bytes_are_a_real_masks():
    from megalm.model.documents import Packing, document_block_mask
    from megalm.perf.plan import document_mask_bytes

    documents = torch.arange(2 * 1000).reshape(2, 1000) // 37  # 2 samples of 1000 tokens, documents of 37
    mask = document_block_mask(documents)
    tensors = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, documents]
    assert sum(t.nbytes for t in tensors) == document_mask_bytes(2, 1000)
    dense = Packing(documents=documents).document_mask(cuda=False, seq=1000)
    assert dense.nbytes == document_mask_bytes(2, 1000, device="cpu")
    cfg = load_config(ROOT / "configs" / "llama-7b.yaml", ["model.document_mask=true"])
    masked, plain = make_plan(cfg, 8), make_plan(load_config(ROOT / "configs" / "llama-7b.yaml"), 8)
    assert masked.activations - plain.activations == document_mask_bytes(2, 4096)
