"""Parameter names and layouts between megalm's GPT (tensor size 1) and Hugging Face's Llama-like
causal LMs (Llama, Qwen2, Qwen3, Mistral: one naming, `model.layers.N.self_attn.q_proj`, with the
tensors of the features the model has) and GPT2LMHeadModel. Only the mapping; which family uses
which is megalm.convert.families.

Layout differences handled here:
- megalm fuses Q, K, V by kv group: [q heads of group g, k_g, v_g] for g = 0..G-1 (see
  megalm.model.layers.Attention); HF Llama has separate q/k/v_proj, GPT-2 one c_attn = [Q; K; V].
- megalm fuses SwiGLU's gate and up as fc1 = [gate; up] (HF: gate_proj, up_proj).
- GPT-2's Conv1D stores weights (in, out): transposed against torch.nn.Linear's (out, in).
- megalm's embedding and head have V_pad >= V rows; the padding is zero and never exported.
- MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE): megalm's experts are transformers 5.x's fused tensors
  (w1 = gate_up_proj [E, 2I, H], w2 = down_proj [E, H, I]); the files transformers saves, and that
  to-hf writes, hold the legacy per-expert matrices (ExpertNames), which from-hf reads as well as
  the fused ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from megalm.config import ModelConfig
from megalm.model.moe import is_moe_layer
from megalm.parallel.vocab import pad_vocab_rows


@dataclass(frozen=True)
class ExpertNames:
    """A family's names for a MoE layer, under `model.layers.N.`: the router, and expert j's gate,
    up and down matrices as saved (legacy per-expert keys, `{j}` in them)."""

    router: str
    gate: str
    up: str
    down: str


QWEN_MOE = ExpertNames("mlp.gate.weight", "mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                       "mlp.experts.{j}.down_proj.weight")
MIXTRAL = ExpertNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.w1.weight",
                      "block_sparse_moe.experts.{j}.w3.weight", "block_sparse_moe.experts.{j}.w2.weight")
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""transformers 5.x's in-memory names of the fused experts, which it also loads from files."""


def saved_names(names: list[str], cfg: ModelConfig, experts: ExpertNames) -> list[str]:
    """The names transformers saves for a model whose in-memory state dict has `names`: a MoE layer's
    fused experts and router under the family's per-expert names (what to-hf writes)."""
    out = []
    for name in names:
        prefix, _, rest = name.partition("mlp.")
        if rest == "gate.weight":
            out.append(prefix + experts.router)
        elif rest in ("experts.gate_up_proj", "experts.down_proj"):
            kinds = (experts.gate, experts.up) if rest.endswith("gate_up_proj") else (experts.down,)
            out += [prefix + k.format(j=j) for j in range(cfg.moe_num_experts) for k in kinds]
        else:
            out.append(name)
    return out


def _moe_from_hf(hf: dict[str, torch.Tensor], h: str, m: str, cfg: ModelConfig, names: ExpertNames) -> dict[str, torch.Tensor]:
    out = {m + "mlp.router.weight": hf[h + names.router] if h + names.router in hf else hf[h + "mlp.gate.weight"]}
    if h + FUSED[0] in hf:
        out[m + "mlp.experts.w1"], out[m + "mlp.experts.w2"] = hf[h + FUSED[0]], hf[h + FUSED[1]]
    else:
        experts = range(cfg.moe_num_experts)
        out[m + "mlp.experts.w1"] = torch.stack(
            [torch.cat([hf[h + names.gate.format(j=j)], hf[h + names.up.format(j=j)]]) for j in experts])
        out[m + "mlp.experts.w2"] = torch.stack([hf[h + names.down.format(j=j)] for j in experts])
    if cfg.moe_shared_expert_size:
        s = h + "mlp.shared_expert."
        out[m + "mlp.shared.fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"]])
        out[m + "mlp.shared.fc2.weight"] = hf[s + "down_proj.weight"]
        if cfg.moe_shared_expert_gate:
            out[m + "mlp.shared_gate.weight"] = hf[h + "mlp.shared_expert_gate.weight"]
    return out


def _moe_to_hf(state: Mapping[str, torch.Tensor], h: str, m: str, cfg: ModelConfig,
               names: ExpertNames) -> Iterator[tuple[str, torch.Tensor]]:
    yield h + names.router, state[m + "mlp.router.weight"]
    w1, w2 = state[m + "mlp.experts.w1"], state[m + "mlp.experts.w2"]
    for j in range(cfg.moe_num_experts):
        gate, up = w1[j].chunk(2, dim=0)
        yield h + names.gate.format(j=j), gate.contiguous()
        yield h + names.up.format(j=j), up.contiguous()
        yield h + names.down.format(j=j), w2[j].contiguous()
    if cfg.moe_shared_expert_size:
        gate, up = state[m + "mlp.shared.fc1.weight"].chunk(2, dim=0)
        yield h + "mlp.shared_expert.gate_proj.weight", gate.contiguous()
        yield h + "mlp.shared_expert.up_proj.weight", up.contiguous()
        yield h + "mlp.shared_expert.down_proj.weight", state[m + "mlp.shared.fc2.weight"]
        if cfg.moe_shared_expert_gate:
            yield h + "mlp.shared_expert_gate.weight", state[m + "mlp.shared_gate.weight"]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(H hd, ...), (G hd, ...), (G hd, ...) -> (G (H/G + 2) hd, ...) grouped by kv head."""
    r, rest = num_heads // num_kv_heads, q.shape[1:]
    q = q.reshape(num_kv_heads, r, -1, *rest)
    k = k.reshape(num_kv_heads, 1, -1, *rest)
    v = v.reshape(num_kv_heads, 1, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: (Q (H hd, ...), K (G hd, ...), V (G hd, ...))."""
    r, rest = num_heads // num_kv_heads, qkv.shape[1:]
    grouped = qkv.reshape(num_kv_heads, r + 2, -1, *rest)
    q = grouped[:, :r].reshape(-1, *rest)
    return q, grouped[:, r].reshape(-1, *rest), grouped[:, r + 1].reshape(-1, *rest)


def decoder_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int,
                    experts: ExpertNames = QWEN_MOE) -> dict[str, torch.Tensor]:
    """HF Llama-like state dict -> megalm GPT (tensor size 1) state dict; q/k/v biases (qkv_bias)
    fused by kv group as the weights, qk-norm weights (qk_norm) as they are, MoE layers' experts
    stacked (named as `experts` says, or already fused)."""
    out = {"embedding.word.weight": pad_vocab_rows(hf["model.embed_tokens.weight"], padded_vocab),
           "final_norm.norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.linear.weight"] = pad_vocab_rows(hf["lm_head.weight"], padded_vocab)
    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}.", f"blocks.{i}."
        out[m + "norm1.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "norm2.weight"] = hf[h + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            out[f"{m}attn.qkv.{kind}"] = fuse_qkv(
                *(hf[f"{h}self_attn.{x}_proj.{kind}"] for x in "qkv"), cfg.num_heads, cfg.num_kv_heads
            )
        if cfg.qk_norm:
            out[m + "attn.q_norm.weight"] = hf[h + "self_attn.q_norm.weight"]
            out[m + "attn.k_norm.weight"] = hf[h + "self_attn.k_norm.weight"]
        out[m + "attn.proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        if is_moe_layer(cfg, i):
            out.update(_moe_from_hf(hf, h, m, cfg, experts))
            continue
        out[m + "mlp.fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        out[m + "mlp.fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    return out


def gpt2_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state dict -> megalm GPT (tensor size 1) state dict (tied or untied head)."""
    out = {"embedding.word.weight": pad_vocab_rows(hf["transformer.wte.weight"], padded_vocab),
           "embedding.position.weight": hf["transformer.wpe.weight"],
           "final_norm.norm.weight": hf["transformer.ln_f.weight"],
           "final_norm.norm.bias": hf["transformer.ln_f.bias"]}
    n = cfg.num_heads
    for i in range(cfg.num_layers):
        h, m = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{m}{ours}.weight"], out[f"{m}{ours}.bias"] = hf[f"{h}{theirs}.weight"], hf[f"{h}{theirs}.bias"]
        out[m + "attn.qkv.weight"] = fuse_qkv(*hf[h + "attn.c_attn.weight"].t().chunk(3, dim=0), n, n)
        out[m + "attn.qkv.bias"] = fuse_qkv(*hf[h + "attn.c_attn.bias"].chunk(3, dim=0), n, n)
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{m}{ours}.weight"] = hf[f"{h}{theirs}.weight"].t()
            out[f"{m}{ours}.bias"] = hf[f"{h}{theirs}.bias"]
    if not cfg.tie_embeddings:
        out["head.linear.weight"] = pad_vocab_rows(hf["lm_head.weight"], padded_vocab)
    return out


def decoder_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                  experts: ExpertNames = QWEN_MOE) -> Iterator[tuple[str, torch.Tensor]]:
    """megalm GPT (tensor size 1, vocabulary padding stripped) -> (HF Llama-like name, tensor),
    one module at a time: `state` may read each parameter only when it is asked for. With tied
    embeddings lm_head.weight is left out (HF ties it to embed_tokens). MoE layers are written
    with `experts`' per-expert names, as transformers saves them."""
    yield "model.embed_tokens.weight", state["embedding.word.weight"]
    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}.", f"blocks.{i}."
        yield h + "input_layernorm.weight", state[m + "norm1.weight"]
        yield h + "post_attention_layernorm.weight", state[m + "norm2.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = split_qkv(state[f"{m}attn.qkv.{kind}"], cfg.num_heads, cfg.num_kv_heads)
            yield from ((f"{h}self_attn.{x}_proj.{kind}", t.contiguous()) for x, t in zip("qkv", (q, k, v), strict=True))
        if cfg.qk_norm:
            yield h + "self_attn.q_norm.weight", state[m + "attn.q_norm.weight"]
            yield h + "self_attn.k_norm.weight", state[m + "attn.k_norm.weight"]
        yield h + "self_attn.o_proj.weight", state[m + "attn.proj.weight"]
        if is_moe_layer(cfg, i):
            yield from _moe_to_hf(state, h, m, cfg, experts)
            continue
        gate, up = state[m + "mlp.fc1.weight"].chunk(2, dim=0)
        yield h + "mlp.gate_proj.weight", gate.contiguous()
        yield h + "mlp.up_proj.weight", up.contiguous()
        yield h + "mlp.down_proj.weight", state[m + "mlp.fc2.weight"]
    yield "model.norm.weight", state["final_norm.norm.weight"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", state["head.linear.weight"]


def gpt2_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """megalm GPT (tensor size 1, padding stripped) -> (HF GPT2LMHeadModel name, tensor) (Conv1D
    weights are [in, out]), one module at a time as decoder_to_hf."""
    yield "transformer.wte.weight", state["embedding.word.weight"]
    yield "transformer.wpe.weight", state["embedding.position.weight"]
    n = cfg.num_heads
    for i in range(cfg.num_layers):
        h, m = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            yield f"{h}{theirs}.weight", state[f"{m}{ours}.weight"]
            yield f"{h}{theirs}.bias", state[f"{m}{ours}.bias"]
        yield h + "attn.c_attn.weight", torch.cat(split_qkv(state[m + "attn.qkv.weight"], n, n)).t().contiguous()
        yield h + "attn.c_attn.bias", torch.cat(split_qkv(state[m + "attn.qkv.bias"], n, n))
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            yield f"{h}{theirs}.weight", state[f"{m}{ours}.weight"].t().contiguous()
            yield f"{h}{theirs}.bias", state[f"{m}{ours}.bias"]
    yield "transformer.ln_f.weight", state["final_norm.norm.weight"]
    yield "transformer.ln_f.bias", state["final_norm.norm.bias"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", state["head.linear.weight"]
