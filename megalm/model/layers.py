"""Transformer building blocks: norms, rotary embedding, KV cache, attention, MLP.

Written to be exactly Hugging Face's LlamaForCausalLM (RMSNorm, rotate-half RoPE, SwiGLU, GQA,
no biases) and GPT2LMHeadModel (LayerNorm, tanh-GELU, biases), with the features of the families
built on Llama (q/k/v biases of Qwen2, per-head qk-norm and a free head_dim of Qwen3, Mistral's
sliding window), so weights convert one to one.
Attention and MLP are built from the tensor-parallel layers of megalm.parallel.layers, split as
the TensorParallel context says; with one tensor rank they are plain single-process layers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.model.documents import Packing, causal_mask, masked_attention
from megalm.model.rope import rope_cos_sin
from megalm.parallel.context import TensorParallel
from megalm.parallel.context_parallel import UlyssesAttention, chunk_positions
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    mark_replicated,
    sequence_parallel_param,
)
from megalm.parallel.mappings import group_rank
from megalm.parallel.random import maybe_fork, normal_init


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF Llama)."""

    def __init__(self, dim: int, eps: float, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.eps, self.group, self.sequence_parallel = eps, group, sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return sequence_parallel_param(self.weight, self.group, self.sequence_parallel) * x.to(dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm whose parameters, under sequence parallelism, get the full gradient."""

    def __init__(self, dim: int, eps: float, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False) -> None:
        super().__init__(dim, eps=eps)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = sequence_parallel_param(self.weight, self.group, self.sequence_parallel)
        b = sequence_parallel_param(self.bias, self.group, self.sequence_parallel)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def build_norm(cfg: ModelConfig, tp: TensorParallel) -> nn.Module:
    """RMSNorm (llama) or LayerNorm with bias (gpt2); parameters replicated on the tensor ranks.
    Under sequence parallelism their gradients are summed over the tensor group inside autograd."""
    cls = RMSNorm if cfg.arch == "llama" else LayerNorm
    norm = cls(cfg.hidden_size, cfg.norm_eps, group=tp.group, sequence_parallel=tp.sequence_parallel)
    mark_replicated(norm, tp.sequence_parallel)
    return norm


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x (batch, seq, heads, head_dim), cos/sin ([batch,] seq, head_dim)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos = cos.to(x.dtype)[:, :, None, :]
    sin = sin.to(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of one layer for generation: (batch, max_len, kv_heads_local, head_dim)."""

    def __init__(
        self, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seq, kv_heads, head_dim) at start_pos; return all keys/values so far."""
        end = start_pos + k.size(1)
        if end > self.k.size(1):
            raise MegalmError(f"KV cache holds {self.k.size(1)} positions, asked for {end}")
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]


def _local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    if cfg.num_heads % tp or cfg.num_kv_heads % tp:
        raise MegalmError(
            f"attention heads ({cfg.num_heads}) and kv heads ({cfg.num_kv_heads}) must divide by the "
            f"tensor-parallel size ({tp}): use a tensor size that divides the kv heads, or more kv heads"
        )
    return cfg.num_heads // tp, cfg.num_kv_heads // tp


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, sharded by kv group over the tensor ranks.

    The fused QKV weight is laid out by kv group g = 0..G-1: [q heads of g (H/G of them), k_g, v_g],
    each head_dim rows, so a contiguous split over p ranks (p | G) gives each rank whole groups.
    Query head h uses kv head h // (H/G), as HF's repeat_kv. With document ids (Packing.documents)
    attention stays inside each document (megalm.model.documents); under context parallelism the
    rank's chunk is exchanged for whole sequences of a slice of the heads (Ulysses), and the
    contiguous head slices keep whole kv groups.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, generator: torch.Generator) -> None:
        super().__init__()
        self.cfg, self.rng, self.context = cfg, tp.rng, tp.context
        self.ulysses = UlyssesAttention(self._attend, tp.context) if tp.context is not None else None
        self.head_dim = cfg.head_dim
        self.heads, self.kv_heads = _local_heads(cfg, tp.size)
        bias = cfg.arch == "gpt2"
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * self.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, group=tp.group, bias=bias or cfg.qkv_bias, sequence_parallel=tp.sequence_parallel,
            init_method=normal_init(cfg.init_std, generator),
        )
        self.proj = RowParallelLinear(
            cfg.num_heads * self.head_dim, cfg.hidden_size, group=tp.group, bias=bias,
            sequence_parallel=tp.sequence_parallel,
            init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers), generator),
        )
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # each rank normalises its own heads: the shared weights' gradients are summed
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, group=tp.group, sequence_parallel=True)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, group=tp.group, sequence_parallel=True)
            for norm in (self.q_norm, self.k_norm):
                mark_replicated(norm, sequence_parallel=True)

    def _rope(self, packing: Packing, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of this rank's s positions: rows of the model's table (packed positions restart
        inside the sample, so they stay below max_seq_len), else computed."""
        table = packing.rope
        if packing.positions is not None:
            return (table[0][packing.positions], table[1][packing.positions]) if table is not None else \
                rope_cos_sin(packing.positions, self.cfg, self.head_dim)
        start = packing.start_pos + group_rank(self.context) * s  # this rank's contiguous chunk
        if table is not None and start + s <= table[0].size(0):
            return table[0][start:start + s], table[1][start:start + s]
        return rope_cos_sin(chunk_positions(s, self.context, device, packing.start_pos), self.cfg, self.head_dim)

    def forward(self, x: torch.Tensor, packing: Packing | None = None, cache: KVCache | None = None) -> torch.Tensor:
        packing = packing or Packing()
        qkv = self.qkv(x)  # (batch, seq, kv_local * (per_group + 2) * head_dim)
        b, s, _ = qkv.shape
        per_group = self.heads // self.kv_heads
        qkv = qkv.view(b, s, self.kv_heads, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim)  # (batch, seq, heads, head_dim)
        k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]  # (batch, seq, kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.arch == "llama":
            cos, sin = self._rope(packing, s, x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, packing.start_pos)
        if self.ulysses is not None:  # (batch, seq / C, heads, d) -> whole sequences of heads / C and back
            out = self.ulysses(q, k, v, packing=packing)
        else:
            out = self._attend(q, k, v, packing=packing)
        return self.proj(out.reshape(b, s, self.heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packing: Packing) -> torch.Tensor:
        """(batch, seq, heads, head_dim) -> the same: softmax(q k^T / sqrt(head_dim) + mask) v, the
        mask causal, within each document when the packing has documents, within the sliding window
        when the model has one (megalm.model.documents)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, seq, head_dim)
        s, total, start_pos, window = q.size(2), k.size(2), packing.start_pos, self.cfg.sliding_window
        if packing.documents is not None or (window and start_pos == 0 and s > 1):
            return masked_attention(q, k, v, packing, window).transpose(1, 2)
        mask = None
        if start_pos > 0 and (s > 1 or window):  # new queries at start_pos.. see keys up to their own position
            mask = causal_mask(start_pos, s, total, window, q.device)
        p = self.cfg.dropout if self.training else 0.0
        with maybe_fork(self.rng if p > 0 else None):  # heads differ per tensor rank: the tracker
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None and s > 1,
                enable_gqa=q.size(1) != k.size(1),
            )
        return out.transpose(1, 2)


class MLP(nn.Module):
    """llama: W_2 (silu(X G) * (X U)) with [G, U] fused column-parallel (stride 2) and W_2
    row-parallel. gpt2: W_2 gelu_tanh(X W_1 + b_1) + b_2. `width`: the inner width (default
    model.ffn_hidden_size)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, generator: torch.Generator, width: int | None = None) -> None:
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = not self.gated
        width = width or cfg.ffn_hidden_size  # a MoE layer's shared expert has its own
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size, 2 * width if self.gated else width, group=tp.group, bias=bias,
            sequence_parallel=tp.sequence_parallel, stride=2 if self.gated else 1,
            init_method=normal_init(cfg.init_std, generator),
        )
        self.fc2 = RowParallelLinear(
            width, cfg.hidden_size, group=tp.group, bias=bias, sequence_parallel=tp.sequence_parallel,
            init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.num_layers), generator),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (batch, seq, [2 *] ffn / p)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)
