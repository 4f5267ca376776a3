"""Parameter counts and FLOPs per token against hand-computed values of known models."""

import pytest

from megalm.config import ModelConfig
from megalm.model import GPT
from megalm.model.flops import (
    count_module_parameters,
    count_parameters,
    flops_per_token_megatron,
    flops_per_token_palm,
)
from megalm.parallel.context import TensorParallel

GPT2_124M = ModelConfig(
    arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257, max_seq_len=1024,
)
LLAMA_7B = ModelConfig(
    arch="llama", hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
    vocab_size=32000, max_seq_len=4096,
)


def test_parameter_counts_of_published_models():
    assert count_parameters(GPT2_124M) == 124_439_808  # HF gpt2, wpe included, head tied
    # non-embedding: minus wte (50257 x 768) and wpe (1024 x 768)
    assert count_parameters(GPT2_124M, embeddings=False) == 124_439_808 - 38_597_376 - 786_432
    assert count_parameters(LLAMA_7B) == 6_738_415_616  # Meta's Llama-2-7B
    assert count_parameters(LLAMA_7B, embeddings=False) == 6_738_415_616 - 2 * 32000 * 4096


def test_palm_flops_gpt2():
    # 6 N + 12 L d T = 6 * 85,056,000 + 12 * 12 * 768 * 1024
    assert flops_per_token_palm(GPT2_124M, 1024) == 510_336_000 + 113_246_208


def test_megatron_flops_gpt2_matches_the_papers_formula():
    # 72 L d^2 + 12 L d T + 6 d V (= 72 L d^2 (1 + T/(6d) + V/(12 d L)))
    expected = 509_607_936 + 113_246_208 + 231_584_256
    assert flops_per_token_megatron(GPT2_124M, 1024) == expected == 854_438_400
    assert flops_per_token_megatron(GPT2_124M, 1024, recompute=True) == expected * 4 // 3


def test_a_sliding_window_bounds_the_attention_flops():
    from megalm.model.flops import flops_per_token_palm

    cfg = ModelConfig(arch="llama", hidden_size=64, num_layers=2, num_heads=4, vocab_size=1000, max_seq_len=4096)
    windowed = ModelConfig(**{**cfg.__dict__, "family": "mistral", "sliding_window": 512})
    assert flops_per_token_palm(windowed, 4096) == flops_per_token_palm(cfg, 512) < flops_per_token_palm(cfg, 4096)
    assert flops_per_token_megatron(windowed, 256) == flops_per_token_megatron(cfg, 256)  # a window wider than T


def test_megatron_flops_llama_gqa_swiglu():
    cfg = ModelConfig(
        arch="llama", hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=160,
        vocab_size=1000,
    )
    # per layer matmul weights: qkv 64*(8+4)*8 = 6144, o 4096, mlp 3*64*160 = 30720 -> 40960
    forward = 2 * 2 * 40960 + 4 * 2 * 128 * 64 + 2 * 64 * 1000
    assert flops_per_token_megatron(cfg, 128) == 3 * forward


FEATURES = [{}, {"family": "qwen2", "qkv_bias": True}, {"family": "qwen3", "qk_norm": True, "head_dim": 12},
            {"family": "mistral", "head_dim": 6, "sliding_window": 4}]


@pytest.mark.parametrize("arch,tie,features", [("llama", False, f) for f in FEATURES] + [("llama", True, {}),
                                                                                           ("gpt2", True, {})])
def test_analytic_count_equals_built_model(arch, tie, features):
    # tools/plan.py's count: q/k/v biases, qk-norm weights and a free head_dim included (issue 22)
    cfg = ModelConfig(
        arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2 if arch == "llama" else 4,
        vocab_size=128, max_seq_len=16, tie_embeddings=tie, **features,
    )
    model = GPT(cfg, TensorParallel.build(None, seed=0))  # vocab 128 is a multiple of 64: no padding rows
    assert count_module_parameters(model) == count_parameters(cfg)
    assert count_module_parameters(model, embeddings=False) == count_parameters(cfg, embeddings=False)
