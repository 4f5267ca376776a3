"""Parameter counts and training FLOPs per token, from the ModelConfig alone.

Notation: d hidden, L layers, H query heads, G kv heads, h head dim (model.head_dim, d / H unless
set), f MLP width, V the tokenizer's vocabulary (padding excluded), T sequence length (the sliding
window W when it is shorter: a query sees at most W keys).

Two FLOP conventions (a multiply-add is 2 FLOPs; training = forward + backward = 3 x forward):

- PaLM (Chowdhery et al. 2022, appendix B), used for MFU: 6 N + 12 L H h T, with N the
  non-embedding parameters (token and position embeddings and the output head excluded); in a
  mixture of experts the active ones: the router, k of the E experts and the shared expert.
- Megatron (Narayanan et al. 2021): every matmul, including the LM head and attention scores:
  3 x [2 (matmul weights of the blocks, k of E experts) + 4 L T H h + 2 d V]; with full activation recomputation
  the forward runs twice: 4 x [...]. For GPT-2 shapes this is 72 L d^2 (1 + T/(6d) + V/(12 d L)).
"""

from __future__ import annotations

from torch import nn

from megalm.config import ModelConfig
from megalm.model.moe import is_moe_layer


def block_parameters(cfg: ModelConfig, layer: int = 0, *, active: bool = False) -> tuple[int, int]:
    """(matmul weights, all parameters) of block `layer`. A MoE block (megalm.model.moe) has the
    router (E d), E experts of 3 d f_e and a shared expert of 3 d f_s (with its gate d); `active`
    counts the k experts a token goes through instead of the E (the FLOPs one token costs)."""
    d, h = cfg.hidden_size, cfg.head_dim
    qkv = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * h
    proj = cfg.num_heads * h * d
    if cfg.arch == "llama":  # SwiGLU: gate, up, down; two RMSNorm weights; q/k/v biases, qk-norm weights if set
        if is_moe_layer(cfg, layer):
            experts = cfg.moe_top_k if active else cfg.moe_num_experts
            mlp = cfg.moe_num_experts * d + 3 * d * cfg.moe_ffn_hidden_size * experts
            mlp += 3 * d * cfg.moe_shared_expert_size + d * cfg.moe_shared_expert_gate
        else:
            mlp = 3 * d * cfg.ffn_hidden_size
        extra = (cfg.num_heads + 2 * cfg.num_kv_heads) * h * cfg.qkv_bias + 2 * h * cfg.qk_norm
        return qkv + proj + mlp, qkv + proj + mlp + 2 * d + extra
    mlp = 2 * d * cfg.ffn_hidden_size
    biases = (cfg.num_heads + 2 * cfg.num_kv_heads) * h + d + cfg.ffn_hidden_size + d
    return qkv + proj + mlp, qkv + proj + mlp + biases + 4 * d  # + two LayerNorms (weight, bias)


def count_parameters(cfg: ModelConfig, *, embeddings: bool = True, active: bool = False) -> int:
    """Parameters of the model (vocabulary padding excluded). `embeddings=False` leaves out the
    token embedding, gpt2's position embedding and an untied head (Kaplan's/PaLM's N); `active`
    counts, in MoE blocks, the top-k experts a token uses instead of all of them."""
    d = cfg.hidden_size
    final_norm = d if cfg.arch == "llama" else 2 * d
    total = sum(block_parameters(cfg, i, active=active)[1] for i in range(cfg.num_layers)) + final_norm
    if embeddings:
        total += cfg.vocab_size * d
        total += cfg.max_seq_len * d if cfg.arch == "gpt2" else 0
        total += 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return total


def count_module_parameters(model: nn.Module, *, embeddings: bool = True) -> int:
    """Elements of a built model's parameters (shared ones once; this rank's shards only;
    padding rows included). `embeddings=False` skips the `embedding.*` and `head.*` modules."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (not embeddings and name.split(".")[0] in ("embedding", "head")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _context(cfg: ModelConfig, seq_len: int) -> int:
    """The keys a query attends to at most: T, or the sliding window when shorter."""
    return min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len


def flops_per_token_palm(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM convention: 6 N + 12 L H h T (N without embeddings/head)."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * _context(cfg, seq_len)
    return 6 * count_parameters(cfg, embeddings=False, active=True) + attention


def flops_per_token_megatron(cfg: ModelConfig, seq_len: int, *, recompute: bool = False) -> int:
    """Training FLOPs per token, Megatron convention: 3 (or 4 with full recomputation) x the
    forward matmul FLOPs of the blocks, the attention scores and values, and the LM head."""
    d, heads_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    forward = (
        2 * sum(block_parameters(cfg, i, active=True)[0] for i in range(cfg.num_layers))
        + 4 * cfg.num_layers * _context(cfg, seq_len) * heads_dim  # Q K^T and (softmax) V
        + 2 * d * cfg.vocab_size  # LM head
    )
    return (4 if recompute else 3) * forward
