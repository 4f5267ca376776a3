"""The Hugging Face families megalm converts, each declared once, here.

A Family is one transformers causal-LM class: its model_type (megalm's `model.family`), which of
megalm's model features the class has, how its config maps to a ModelConfig and back, and how its
tensors are named (megalm.convert.hf_names). The model (megalm.model) knows features, never
families; start-up checks that `model.family` can carry the model's features (`family_mismatch`),
from-hf reads a family's config (`model_config_from_hf`), to-hf writes one (`hf_config`).

Adding a family is one entry in FAMILIES and its tests (tests/convert/test_families.py).

    family   class              features it carries (fixed: the class always has it)
    llama    LlamaForCausalLM   rope scaling, free head_dim
    gpt2     GPT2LMHeadModel    (learned positions, LayerNorm, biases: arch gpt2)
    qwen2    Qwen2ForCausalLM   q/k/v biases (fixed), rope scaling, sliding window on every layer
    qwen3    Qwen3ForCausalLM   qk-norm (fixed), free head_dim, rope scaling, sliding window on every layer
    mistral  MistralForCausalLM free head_dim, rope scaling, sliding window
    mixtral    MixtralForCausalLM   experts on every layer (fixed), top-k renormalised, free head_dim,
                                    rope scaling, sliding window
    qwen2_moe  Qwen2MoeForCausalLM  experts, q/k/v biases (fixed), a gated shared expert (fixed),
                                    norm_topk_prob, sparse step, dense layers, rope scaling
    qwen3_moe  Qwen3MoeForCausalLM  experts, qk-norm (fixed), free head_dim, norm_topk_prob, sparse
                                    step, dense layers, rope scaling, sliding window
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megalm import seams
from megalm.config import ModelConfig
from megalm.convert.hf_names import (
    MIXTRAL,
    QWEN_MOE,
    ExpertNames,
    decoder_from_hf,
    decoder_to_hf,
    gpt2_from_hf,
    gpt2_to_hf,
    saved_names,
)
from megalm.convert.hf_rope import rope_from_hf, rope_to_hf
from megalm.errors import MegalmError


@dataclass(frozen=True)
class Family:
    name: str
    """transformers' model_type, and megalm's model.family."""
    hf_class: str
    """The transformers class to-hf writes (config.architectures)."""
    arch: str
    """megalm's block structure (model.arch)."""
    qkv_bias: bool = False
    """The class always has biases on q, k, v (and no other); false: never."""
    qk_norm: bool = False
    """The class always has qk-norm; false: never."""
    free_head_dim: bool = False
    """Its config has head_dim; false: head_dim is hidden_size / num_heads."""
    window: bool = False
    """Its config can put a sliding window on every layer."""
    moe: tuple[str, ...] = ()
    """Mixture of experts: the model.moe_* keys its config can set (experts, top-k and expert width
    always); the other moe keys must keep their defaults. (): a dense class."""
    config_from_hf: Callable[[Any], dict[str, Any]] = dict
    """transformers config -> ModelConfig keywords (unsupported fields are MegalmErrors)."""
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] = dict
    """ModelConfig -> the class's config keywords (bos/eos/pad and dtype are added by hf_config)."""
    from_hf: Callable[[dict[str, torch.Tensor], ModelConfig, int], dict[str, torch.Tensor]] = dict
    """HF state dict -> megalm GPT state dict (tensor size 1, vocabulary padded to the int)."""
    to_hf: Callable[[Mapping[str, torch.Tensor], ModelConfig], Iterator[tuple[str, torch.Tensor]]] = iter
    """megalm GPT state (padding stripped) -> (HF name, tensor), one module at a time."""
    saved_names: Callable[[list[str], ModelConfig], list[str]] = lambda names, cfg: names
    """The class's in-memory state-dict names -> the names its files hold (MoE: per-expert)."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise MegalmError(f"this Hugging Face model uses {what}, which megalm's GPT does not implement")


# ----------------------------------------------------------------------------- Llama-like configs


def _decoder_from_hf(c: Any, *, head_dim: bool, window: int = 0) -> dict[str, Any]:
    """The fields every Llama-like config shares (RMSNorm, RoPE, SwiGLU, GQA)."""
    _require(c.hidden_act == "silu", f"hidden_act {c.hidden_act}")
    default_head_dim = c.hidden_size // c.num_attention_heads
    hd = getattr(c, "head_dim", None) or default_head_dim
    _require(head_dim or hd == default_head_dim, f"head_dim {hd} (not hidden_size / num_attention_heads) in {c.model_type}")
    return dict(
        arch="llama", family=c.model_type, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=hd,
        ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings,
        norm_eps=c.rms_norm_eps, tie_embeddings=bool(c.tie_word_embeddings), dropout=0.0, sliding_window=window,
        **rope_from_hf(seams.rope_parameters_of(c), c.max_position_embeddings),
    )


def _decoder_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, **seams.rope_kwargs(rope_to_hf(cfg)),
    )


def _qwen_window(c: Any) -> int:
    """Qwen2/3's window: on layers >= max_window_layers when use_sliding_window (layer_types)."""
    kinds = set(getattr(c, "layer_types", None) or ["full_attention"])
    _require(kinds <= {"full_attention", "sliding_attention"}, f"attention layer types {sorted(kinds)}")
    _require(len(kinds) == 1, "sliding-window attention on some layers only (max_window_layers)")
    return int(c.sliding_window or 0) if kinds == {"sliding_attention"} else 0


def _qwen_window_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.sliding_window:
        return dict(use_sliding_window=False)
    return dict(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0)


def _llama_from_hf(c: Any) -> dict[str, Any]:
    _require(not c.attention_bias and not c.mlp_bias, "attention/MLP biases (attention_bias, mlp_bias)")
    return _decoder_from_hf(c, head_dim=True)


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_decoder_to_hf(cfg), head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)


def _qwen2_from_hf(c: Any) -> dict[str, Any]:
    return dict(_decoder_from_hf(c, head_dim=False, window=_qwen_window(c)), qkv_bias=True)


def _qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_decoder_to_hf(cfg), **_qwen_window_to_hf(cfg))


def _qwen3_from_hf(c: Any) -> dict[str, Any]:
    _require(not c.attention_bias, "attention biases (attention_bias) in qwen3")
    return dict(_decoder_from_hf(c, head_dim=True, window=_qwen_window(c)), qk_norm=True)


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_decoder_to_hf(cfg), head_dim=cfg.head_dim, attention_bias=False, **_qwen_window_to_hf(cfg))


def _mistral_from_hf(c: Any) -> dict[str, Any]:
    return _decoder_from_hf(c, head_dim=True, window=int(c.sliding_window or 0))


def _mistral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_decoder_to_hf(cfg), head_dim=cfg.head_dim, sliding_window=cfg.sliding_window or None)


# ----------------------------------------------------------------------------- mixtures of experts


def _moe_from_hf(c: Any, experts: int, width: int, *, topk_norm: bool, sparse: bool) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen-MoE config. router_aux_loss_coef becomes moe_aux_loss_coeff,
    which megalm applies per MoE block (Megatron's convention; transformers pools the blocks, and only
    with output_router_logits): the logged loss is the language model's either way."""
    _require(not getattr(c, "router_jitter_noise", 0.0), "router jitter noise (router_jitter_noise)")
    out = dict(moe_num_experts=experts, moe_top_k=c.num_experts_per_tok, moe_ffn_hidden_size=width,
               moe_norm_topk_prob=topk_norm, moe_aux_loss_coeff=float(c.router_aux_loss_coef or 0.0))
    if sparse:
        out.update(moe_layer_freq=c.decoder_sparse_step, moe_dense_layers=list(c.mlp_only_layers or []))
    return out


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
                output_router_logits=False)


def _qwen_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_moe_to_hf(cfg), num_experts=cfg.moe_num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                norm_topk_prob=cfg.moe_norm_topk_prob, decoder_sparse_step=cfg.moe_layer_freq,
                mlp_only_layers=list(cfg.moe_dense_layers))


def _mixtral_from_hf(c: Any) -> dict[str, Any]:
    return dict(_decoder_from_hf(c, head_dim=True, window=int(c.sliding_window or 0)),
                **_moe_from_hf(c, c.num_local_experts, c.intermediate_size, topk_norm=True, sparse=False))


def _mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    default_head_dim = cfg.head_dim == cfg.hidden_size // cfg.num_heads  # Mixtral's config leaves it None then
    return dict(**_decoder_to_hf(cfg), **_moe_to_hf(cfg), head_dim=None if default_head_dim else cfg.head_dim,
                num_local_experts=cfg.moe_num_experts,
                sliding_window=cfg.sliding_window or None)  # intermediate_size: the experts' (= ffn_hidden_size)


def _qwen2_moe_from_hf(c: Any) -> dict[str, Any]:
    _require(getattr(c, "qkv_bias", True), "no q/k/v biases (qkv_bias false) in qwen2_moe")
    moe = _moe_from_hf(c, c.num_experts, c.moe_intermediate_size, topk_norm=bool(c.norm_topk_prob), sparse=True)
    return dict(_decoder_from_hf(c, head_dim=False, window=_qwen_window(c)), qkv_bias=True, **moe,
                moe_shared_expert_size=c.shared_expert_intermediate_size, moe_shared_expert_gate=True)


def _qwen2_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**_decoder_to_hf(cfg), **_qwen_moe_to_hf(cfg), qkv_bias=True,
                shared_expert_intermediate_size=cfg.moe_shared_expert_size, **_qwen_window_to_hf(cfg))


def _qwen3_moe_from_hf(c: Any) -> dict[str, Any]:
    _require(not c.attention_bias, "attention biases (attention_bias) in qwen3_moe")
    moe = _moe_from_hf(c, c.num_experts, c.moe_intermediate_size, topk_norm=bool(c.norm_topk_prob), sparse=True)
    return dict(_decoder_from_hf(c, head_dim=True, window=_qwen_window(c)), qk_norm=True, **moe)


def _qwen3_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**_decoder_to_hf(cfg), **_qwen_moe_to_hf(cfg), head_dim=cfg.head_dim, attention_bias=False,
                **_qwen_window_to_hf(cfg))


# ----------------------------------------------------------------------------- GPT-2


def _gpt2_from_hf(c: Any) -> dict[str, Any]:
    _require(c.activation_function in ("gelu_new", "gelu_pytorch_tanh"), f"activation {c.activation_function}")
    _require(not c.scale_attn_by_inverse_layer_idx and c.scale_attn_weights, "non-standard attention scaling")
    return dict(
        arch="gpt2", family="gpt2", hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd, vocab_size=c.vocab_size, max_seq_len=c.n_positions,
        norm_eps=c.layer_norm_epsilon, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)), dropout=0.0,
    )


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.num_kv_heads != cfg.num_heads:
        raise MegalmError("a gpt2 model with num_kv_heads != num_heads has no GPT2LMHeadModel equivalent")
    return dict(
        vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_positions=cfg.max_seq_len, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
    )


_DECODER = dict(arch="llama", from_hf=decoder_from_hf, to_hf=decoder_to_hf)


def _moe_names(experts: ExpertNames) -> dict[str, Any]:
    """A MoE family's tensor names: its per-expert names in the files, both ways."""
    return dict(arch="llama", from_hf=partial(decoder_from_hf, experts=experts),
                to_hf=partial(decoder_to_hf, experts=experts), saved_names=partial(saved_names, experts=experts))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", free_head_dim=True, config_from_hf=_llama_from_hf,
           config_to_hf=_llama_to_hf, **_DECODER),
    Family("gpt2", "GPT2LMHeadModel", "gpt2", config_from_hf=_gpt2_from_hf, config_to_hf=_gpt2_to_hf,
           from_hf=gpt2_from_hf, to_hf=gpt2_to_hf),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, window=True, config_from_hf=_qwen2_from_hf,
           config_to_hf=_qwen2_to_hf, **_DECODER),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, free_head_dim=True, window=True,
           config_from_hf=_qwen3_from_hf, config_to_hf=_qwen3_to_hf, **_DECODER),
    Family("mistral", "MistralForCausalLM", free_head_dim=True, window=True, config_from_hf=_mistral_from_hf,
           config_to_hf=_mistral_to_hf, **_DECODER),
    Family("mixtral", "MixtralForCausalLM", free_head_dim=True, window=True, moe=("every_layer",),
           config_from_hf=_mixtral_from_hf, config_to_hf=_mixtral_to_hf, **_moe_names(MIXTRAL)),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", qkv_bias=True, window=True,
           moe=("moe_norm_topk_prob", "moe_layer_freq", "moe_dense_layers", "shared_gated"),
           config_from_hf=_qwen2_moe_from_hf, config_to_hf=_qwen2_moe_to_hf, **_moe_names(QWEN_MOE)),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, free_head_dim=True, window=True,
           moe=("moe_norm_topk_prob", "moe_layer_freq", "moe_dense_layers"),
           config_from_hf=_qwen3_moe_from_hf, config_to_hf=_qwen3_moe_to_hf, **_moe_names(QWEN_MOE)),
)}


# ----------------------------------------------------------------------------- lookups


def family_of(cfg: ModelConfig) -> Family:
    """The model's family; model.family=none (a model no transformers class holds) is a MegalmError."""
    if cfg.family == "none":
        raise MegalmError("model.family=none: this model has no Hugging Face class (no family holds its features, "
                          "megalm/convert/families.py), so it cannot be written as one")
    return FAMILIES[cfg.family or cfg.arch]


_MOE_DEFAULTS = {"moe_layer_freq": 1, "moe_dense_layers": [], "moe_score": "softmax", "moe_norm_topk_prob": True,
                 "moe_router_scale": 1.0, "moe_shared_expert_size": 0, "moe_shared_expert_gate": False,
                 "moe_bias_update_rate": 0.0}


def _holds(f: Family, cfg: ModelConfig) -> dict[str, bool]:
    """Per model key: whether family f's class can hold cfg's value."""
    holds = {"arch": cfg.arch == f.arch, "moe_num_experts": (cfg.moe_num_experts > 0) == bool(f.moe),
             "qkv_bias": cfg.qkv_bias == f.qkv_bias, "qk_norm": cfg.qk_norm == f.qk_norm,
             "head_dim": f.free_head_dim or cfg.head_dim == cfg.hidden_size // cfg.num_heads,
             "sliding_window": f.window or cfg.sliding_window == 0}
    if cfg.moe_num_experts and f.moe:
        for key, default in _MOE_DEFAULTS.items():
            holds[key] = key in f.moe or getattr(cfg, key) == default
        if "shared_gated" in f.moe:  # Qwen2-MoE: a gated shared expert on every MoE layer
            holds["moe_shared_expert_size"] = cfg.moe_shared_expert_size > 0
            holds["moe_shared_expert_gate"] = cfg.moe_shared_expert_gate
        if "every_layer" in f.moe:  # Mixtral: no dense layers, one width
            holds["moe_ffn_hidden_size"] = cfg.moe_ffn_hidden_size == cfg.ffn_hidden_size
    return holds


def family_mismatch(cfg: ModelConfig) -> str | None:
    """Why `cfg.family`'s transformers class cannot hold this model (None: it can, or family none), naming the fix."""
    if cfg.family == "none":
        return None
    f = family_of(cfg)
    bad = [key for key, ok in _holds(f, cfg).items() if not ok]
    if not bad:
        return None
    others = [g.name for g in FAMILIES.values() if all(_holds(g, cfg).values())]
    fix = (f"set model.family={' or '.join(others)}" if others else
           f"no family holds this model; change model.{bad[0]}, or set model.family=none (no Hugging Face export)")
    value = getattr(cfg, bad[0])
    return f"{f.hf_class} cannot hold model.{bad[0]}={str(value).lower() if isinstance(value, bool) else value}: {fix}"


def check_supported(fields: Mapping[str, Any]) -> None:
    """A MegalmError naming what megalm does not convert in a config.json's `fields` (read before
    transformers parses them: its own refusal of a family megalm lacks would be a traceback)."""
    _require(not fields.get("final_logit_softcapping") and not fields.get("attn_logit_softcapping"),
             "logit soft-capping (final_logit_softcapping / attn_logit_softcapping, as Gemma 2)")
    if fields.get("model_type") not in FAMILIES:
        raise MegalmError(f"model_type '{fields.get('model_type')}' is not supported: megalm converts "
                          f"{', '.join(FAMILIES)}")


def model_config_from_hf(config: Any) -> ModelConfig:
    """ModelConfig of a transformers config; a family not listed or a field megalm does not
    implement is a MegalmError naming it."""
    from megalm.config import validate_model  # noqa: PLC0415 - validation imports this module

    check_supported(config.to_dict())
    cfg = ModelConfig(**FAMILIES[config.model_type].config_from_hf(config))
    validate_model(cfg)
    return cfg


def hf_config(cfg: ModelConfig, special: dict[str, Any], dtype: torch.dtype) -> Any:
    """The transformers config of a megalm model (its family's class), with bos/eos/pad `special`."""
    import transformers  # noqa: PLC0415 - heavy

    f = family_of(cfg)
    config = transformers.AutoConfig.for_model(f.name, **f.config_to_hf(cfg), **seams.dtype_kwargs(dtype), **special)
    config.architectures = [f.hf_class]
    return config


def hf_model_class(cfg: ModelConfig) -> type:
    import transformers  # noqa: PLC0415 - heavy

    return getattr(transformers, family_of(cfg).hf_class)
