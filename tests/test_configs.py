"""Every configs/*.yaml loads strictly and validates at the world size its header states, and the
published models have their published parameter counts (built on the meta device up to 1B)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from megalm.config import describe, load_config
from megalm.model.flops import count_module_parameters, count_parameters
from megalm.model.gpt import GPT, padded_vocab
from megalm.parallel.context import TensorParallel
from megalm.perf.plan import make_plan

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
# filled in by tools/quickstart.sh at run time
OVERRIDES = {"quickstart.yaml": ["data.tokenizer_model=tok/spm.model"]}
# the model configs of issue 8: every key of every section written out
COMPLETE = ["gpt2-124m.yaml", "llama-160m.yaml", "llama-1b.yaml", "llama-7b.yaml", "llama-70b.yaml",
            "llama-3.1-8b.yaml", "qwen2.5-7b.yaml", "qwen3-8b.yaml", "mistral-7b.yaml"]
PUBLISHED = {  # parameters (vocabulary padding excluded), and whether to build the model
    "gpt2-124m.yaml": (124_439_808, True),  # HF gpt2: wte + wpe + 12 blocks, head tied
    "llama-160m.yaml": (162_417_408, True),  # JackFram/llama-160m's shape
    "llama-1b.yaml": (1_100_048_384, True),  # TinyLlama-1.1B
    "llama-7b.yaml": (6_738_415_616, False),  # Llama-2-7B
    "llama-70b.yaml": (68_976_648_192, False),  # Llama-2-70B
    "llama-8b-32k.yaml": (8_030_261_248, False),  # Llama-3-8B
    "llama-3.1-8b.yaml": (8_030_261_248, False),  # meta-llama/Llama-3.1-8B
    "qwen2.5-7b.yaml": (7_615_616_512, False),  # Qwen/Qwen2.5-7B (q/k/v biases)
    "qwen3-8b.yaml": (8_190_735_360, False),  # Qwen/Qwen3-8B (qk-norm, head_dim 128)
    "mistral-7b.yaml": (7_241_732_096, False),  # mistralai/Mistral-7B-v0.1
    "qwen3-30b-a3b.yaml": (30_532_122_624, True),  # Qwen/Qwen3-30B-A3B (128 experts, top-8)
    "mixtral-8x7b.yaml": (46_702_792_704, True),  # mistralai/Mixtral-8x7B-v0.1 (8 experts, top-2)
}
ACTIVE = {"qwen3-30b-a3b.yaml": 3_353_032_704, "mixtral-8x7b.yaml": 12_879_925_248}
"""Parameters a token goes through (Qwen's "A3B": 3.3B activated; Mixtral's 12.9B)."""
PUBLISHED_CONFIGS = {  # fields of each model's config.json on the Hugging Face Hub (transformers 5 names
    # Qwen-MoE's num_experts num_local_experts, as its Mixtral)
    "llama-3.1-8b.yaml": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192}},
    "qwen2.5-7b.yaml": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                        "use_sliding_window": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "qwen3-8b.yaml": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                      "attention_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "mistral-7b.yaml": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                        "sliding_window": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "qwen3-30b-a3b.yaml": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                           "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                           "num_key_value_heads": 4, "head_dim": 128, "num_local_experts": 128, "num_experts_per_tok": 8,
                           "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                           "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                           "tie_word_embeddings": False, "use_sliding_window": False,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "mixtral-8x7b.yaml": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                          "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                          "sliding_window": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
}


def stated_world_size(path: Path) -> int:
    """The `# world_size: N` header line of a config (1 when a config states none)."""
    found = re.search(r"^# world_size: (\d+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert found or path.name not in [*COMPLETE, "tiny.yaml", "quickstart.yaml"], path.name
    return int(found.group(1)) if found else 1


def test_the_issue_configs_exist():
    assert {p.name for p in CONFIGS} >= {*COMPLETE, "tiny.yaml", "quickstart.yaml", "llama-8b-32k.yaml"}


def test_long_context_recipe_is_tensor_x_context_x_data_with_document_masking():
    path = CONFIGS[0].parent / "llama-8b-32k.yaml"
    cfg = load_config(path).validate(stated_world_size(path))
    p, m = cfg.parallel, cfg.model
    assert (p.tensor, p.context, cfg.data_parallel, p.pipeline) == (2, 4, 2, 1) and p.sequence_parallel
    assert cfg.data.seq_len == m.max_seq_len == 32768 and m.document_mask
    assert m.num_kv_heads % (p.tensor * p.context) == 0
    header = path.read_text(encoding="utf-8")
    assert "TP2 (sequence parallel) x CP4 x DP2" in header and "# world_size: 16" in header
    plan = make_plan(load_config(path), 16)  # the header's memory is the planner's
    assert f"{plan.rank_bytes(1) / 2**30:.0f} GiB per" in header


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_at_its_stated_world_size(path: Path):
    cfg = load_config(path, OVERRIDES.get(path.name, [])).validate(stated_world_size(path))
    p = cfg.parallel
    assert cfg.data_parallel * p.tensor * p.context * p.pipeline == stated_world_size(path)
    assert cfg.train.steps > 0


@pytest.mark.parametrize("name", COMPLETE)
def test_every_key_is_written_out(name: str):
    # a dense model writes model.moe_num_experts: 0 and may leave out the other moe_* keys and
    # parallel.expert (inert without experts); an AdamW run may leave out the optimizer.muon_* keys
    raw = yaml.safe_load((CONFIGS[0].parent / name).read_text(encoding="utf-8"))
    for section, keys in describe().items():
        if section == "model" and raw["model"].get("moe_num_experts") == 0:
            keys = [k for k in keys if not k.startswith("moe_") or k == "moe_num_experts"]
        if section == "parallel" and raw["model"].get("moe_num_experts") == 0:
            keys = [k for k in keys if k != "expert"]
        if section == "optimizer" and raw["optimizer"].get("name") == "adamw":
            keys = [k for k in keys if not k.startswith("muon_")]
        assert set(raw[section]) == set(keys), (section, set(keys) ^ set(raw[section]))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name: str):
    expected, build = PUBLISHED[name]
    model_cfg = load_config(CONFIGS[0].parent / name).model
    assert count_parameters(model_cfg) == expected
    if name in ACTIVE:
        assert count_parameters(model_cfg, active=True) == ACTIVE[name]
    if not build:
        return
    with torch.device("meta"):
        model = GPT(model_cfg, TensorParallel.build(None))
    # megalm pads the embedding (and an untied head) to a multiple of 64 rows: take them off
    tables = 1 if model_cfg.tie_embeddings else 2
    padding = (padded_vocab(model_cfg, 1) - model_cfg.vocab_size) * model_cfg.hidden_size * tables
    assert count_module_parameters(model) - padding == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_family_presets_export_the_published_config(name: str):
    # to-hf of a model trained from the preset writes the published model's config.json fields
    pytest.importorskip("transformers")
    from megalm.convert.families import hf_config

    config = hf_config(load_config(CONFIGS[0].parent / name).model, {}, torch.bfloat16).to_dict()
    expected = PUBLISHED_CONFIGS[name]
    assert {k: config[k] for k in expected} == expected
