"""RoPE between megalm's model.rope_* keys and transformers' rope_parameters, both ways, in one
place: plain RoPE ("default"), Llama 3's "llama3" and "yarn". Another rope_type is a MegalmError
naming it, never a silently different model."""

from __future__ import annotations

from typing import Any

from megalm.config import ModelConfig
from megalm.errors import MegalmError

SUPPORTED = ("default", "llama3", "yarn")


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' rope_parameters of cfg."""
    params: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                              "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        params.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                      high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_seq_len)
    elif cfg.rope_scaling == "yarn":
        params.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_seq_len,
                      beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor > 0:
            params["attention_factor"] = cfg.rope_attention_factor
    return params


def rope_from_hf(params: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """ModelConfig keywords (rope_theta, rope_scaling, rope_*) of transformers' rope_parameters."""
    kind = params.get("rope_type", "default")
    if kind not in SUPPORTED:
        raise MegalmError(f"this Hugging Face model uses rope scaling {kind}, which megalm's GPT does not implement "
                          f"(megalm implements {', '.join(SUPPORTED)})")
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        return out
    original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    factor = params.get("factor") or max_position_embeddings / original
    out.update(rope_scaling=kind, rope_factor=float(factor), rope_original_max_seq_len=original)
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
        return out
    if params.get("mscale") or params.get("mscale_all_dim"):
        raise MegalmError("this Hugging Face model uses YaRN with mscale/mscale_all_dim (DeepSeek's attention "
                          "scaling), which megalm's GPT does not implement")
    out.update(rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1),
               rope_truncate=bool(params.get("truncate", True)),
               rope_attention_factor=float(params.get("attention_factor") or 0.0))
    return out
