"""RoPE scaling (model.rope_scaling: llama3, yarn): megalm's cos/sin equal transformers' rotary
embedding for the same config, a transformers-made Llama with scaled RoPE gives the same logits in
megalm's GPT past its original context, the config converts both ways, and what megalm does not
implement is one line."""

from __future__ import annotations

import pytest
import torch

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.model import GPT
from megalm.model.rope import rope_cos_sin
from megalm.parallel.context import TensorParallel
from megalm.testing.runs import TINY

transformers = pytest.importorskip("transformers")

ROPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-options": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                     "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "attention_factor": 0.9},
}


def _hf_config(rope: dict, head_dim: int = 16) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=300, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-6, rope_parameters=dict(rope), tie_word_embeddings=False)


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("head_dim", [16, 64])
def test_cos_sin_equal_transformers_rotary_embedding(name, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megalm.convert.hf_import import model_config_from_hf

    hf_cfg = _hf_config(ROPES[name], head_dim)
    cfg = model_config_from_hf(hf_cfg)
    assert cfg.rope_scaling == ROPES[name]["rope_type"]
    positions = torch.arange(128)
    theirs = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, 128, head_dim), positions[None])
    ours = rope_cos_sin(positions, cfg, head_dim)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want[0], rtol=1e-6, atol=1e-6)
    plain = rope_cos_sin(positions, model_config_from_hf(_hf_config({"rope_type": "default",
                                                                     "rope_theta": cfg.rope_theta}, head_dim)), head_dim)
    assert (ours[0] - plain[0]).abs().max() > 1e-2  # the scaling changes the table: the test can fail


@pytest.mark.parametrize("name", sorted(ROPES))
def test_a_transformers_llama_with_scaled_rope_has_the_same_logits_past_its_original_context(name):
    from megalm.convert.hf_import import from_hf_state, model_config_from_hf

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_hf_config(ROPES[name])).eval()
    cfg = model_config_from_hf(hf.config)
    ours = GPT(cfg, TensorParallel.build(None, seed=1)).eval()
    state = from_hf_state(hf.state_dict(), cfg)
    ours.load_state_dict({k: (torch.nn.functional.pad(v, (0, 0, 0, ours.padded_vocab_size - v.size(0)))
                              if v.size(0) == cfg.vocab_size else v) for k, v in state.items()})
    tokens = torch.randint(0, 300, (2, 120), generator=torch.Generator().manual_seed(1))  # > 16 and 32 positions
    with torch.no_grad():
        diff = (ours.logits_full(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_parameters_convert_both_ways(name):
    from megalm.convert.hf_import import model_config_from_hf
    from megalm.convert.hf_rope import rope_to_hf

    rope = ROPES[name]
    back = rope_to_hf(model_config_from_hf(_hf_config(rope)))
    assert {k: back[k] for k in rope} == rope  # every field the source had, with its value


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope scaling linear"),
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "rope scaling dynamic"),
    ({**ROPES["yarn"], "mscale": 1.0, "mscale_all_dim": 1.0}, "mscale"),
])
def test_rope_megalm_does_not_implement_is_one_line(rope, message):
    from megalm.convert.hf_import import model_config_from_hf

    with pytest.raises(MegalmError, match=message):
        model_config_from_hf(_hf_config(rope))


def test_scaled_rope_needs_its_original_context():
    with pytest.raises(MegalmError, match="model.rope_original_max_seq_len"):
        load_config(TINY, ["model.rope_scaling=llama3", "model.rope_factor=8"]).validate(1)
    with pytest.raises(MegalmError, match="needs arch llama"):
        load_config(TINY, ["model.arch=gpt2", "model.num_kv_heads=4", "model.rope_scaling=yarn", "model.rope_factor=2",
                           "model.rope_original_max_seq_len=16"]).validate(1)
    cfg = load_config(TINY, ["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_seq_len=16"])
    assert cfg.validate(1).model.rope_scaling == "yarn"
