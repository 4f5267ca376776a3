"""Hugging Face Llama / GPT-2 directories -> megalm: the ModelConfig and the GPT state dict.

Unsupported features (a RoPE type other than hf_rope.SUPPORTED, biases in Llama, a custom head_dim, other activations) are a
MegalmError naming the feature, never a silently different model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megalm import seams
from megalm.config import ModelConfig, validate_model
from megalm.convert.hf_names import gpt2_from_hf, llama_from_hf
from megalm.convert.hf_rope import rope_from_hf
from megalm.errors import MegalmError


def model_config_from_hf(config: Any) -> ModelConfig:
    """ModelConfig of a transformers LlamaConfig / GPT2Config; unsupported features are MegalmErrors."""
    t = config.model_type
    if t == "llama":
        _require(config.hidden_act == "silu", f"hidden_act {config.hidden_act}")
        _require(not config.attention_bias and not config.mlp_bias, "attention/MLP biases")
        _require(config.head_dim in (None, config.hidden_size // config.num_attention_heads), "a custom head_dim")
        cfg = ModelConfig(
            arch="llama", hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size,
            max_seq_len=config.max_position_embeddings, norm_eps=config.rms_norm_eps,
            tie_embeddings=bool(config.tie_word_embeddings), dropout=0.0,
            **rope_from_hf(seams.rope_parameters_of(config), config.max_position_embeddings),
        )
    elif t == "gpt2":
        _require(config.activation_function in ("gelu_new", "gelu_pytorch_tanh"), f"activation {config.activation_function}")
        _require(not config.scale_attn_by_inverse_layer_idx and config.scale_attn_weights, "non-standard attention scaling")
        cfg = ModelConfig(
            arch="gpt2", hidden_size=config.n_embd, num_layers=config.n_layer, num_heads=config.n_head,
            ffn_hidden_size=config.n_inner or 4 * config.n_embd, vocab_size=config.vocab_size,
            max_seq_len=config.n_positions, norm_eps=config.layer_norm_epsilon,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)), dropout=0.0,
        )
    else:
        raise MegalmError(f"model_type '{t}' is not supported: megalm converts llama and gpt2")
    validate_model(cfg)
    return cfg


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise MegalmError(f"this Hugging Face model uses {what}, which megalm's GPT does not implement")


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state -> megalm GPT state with the tokenizer's vocabulary rows (no padding)."""
    convert = llama_from_hf if cfg.arch == "llama" else gpt2_from_hf
    try:
        return convert(hf, cfg, cfg.vocab_size)
    except KeyError as e:
        raise MegalmError(f"the Hugging Face weights lack {e.args[0]}") from None


def load_hf_dir(hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and megalm state (fp32 is not forced: the file's dtype) of an HF directory."""
    import transformers  # noqa: PLC0415 - heavy

    if not (hf_dir / "config.json").is_file():
        raise MegalmError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    cfg = model_config_from_hf(config)
    return cfg, from_hf_state(read_hf_weights(hf_dir), cfg)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model*.safetensors (or, loaded with weights_only=True, pytorch_model*.bin)."""
    from safetensors.torch import load_file  # noqa: PLC0415 - only conversion needs it

    files = sorted(hf_dir.glob("model*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise MegalmError(f"{hf_dir} has no model*.safetensors or pytorch_model*.bin weights")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
