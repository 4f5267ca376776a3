"""Rotary position embedding: the frequencies of a ModelConfig (plain, Llama 3's `llama3` scaling or
YaRN) and the cos/sin tables the attention blocks read.

The frequencies follow transformers' rotary embedding for the same configuration (HF's rotate-half
layout: frequency k at columns k and k + head_dim/2); tests/model/test_rope.py compares them.

    none     inv_freq_k = theta^(-2k/d)
    llama3   low frequencies (wavelength > original / low_freq_factor) divided by `factor`, high ones
             (wavelength < original / high_freq_factor) kept, a smooth blend between
    yarn     per frequency a blend of theta^(-2k/d) (extrapolation) and it divided by `factor`
             (interpolation), ramped between the dimensions that turn beta_fast and beta_slow times in
             the original context; cos and sin multiplied by the attention factor
             (default 0.1 ln(factor) + 1)
"""

from __future__ import annotations

import math

import torch

from megalm.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, head_dim: int) -> torch.Tensor:
    """The (head_dim / 2,) fp32 inverse frequencies of cfg's RoPE."""
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if cfg.rope_scaling == "llama3":
        original, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelength = 2 * math.pi / base
        scaled = torch.where(wavelength > original / low, base / factor, base)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled)
    if cfg.rope_scaling == "yarn":
        def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times in the original context
            return head_dim * math.log(cfg.rope_original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = dimension(cfg.rope_beta_fast), dimension(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        return base / cfg.rope_factor * ramp + base * (1 - ramp)
    return base


def attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin: YaRN's (given, or 0.1 ln(factor) + 1), else 1."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor > 0:
        return cfg.rope_attention_factor
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


def rope_cos_sin(positions: torch.Tensor, cfg: ModelConfig, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., seq, head_dim) in fp32 of integer `positions` (seq,) or (batch, seq)."""
    freqs = positions.float()[..., None] * inv_frequencies(cfg, head_dim).to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = attention_factor(cfg)
    return emb.cos() * scale, emb.sin() * scale
