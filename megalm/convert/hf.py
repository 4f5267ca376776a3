"""megalm checkpoints <-> Hugging Face transformers directories (Llama and GPT-2).

to_hf: checkpoint -> unsharded fp32 state (reader) -> HF names (hf_names) -> LlamaForCausalLM /
GPT2LMHeadModel built on the meta device -> save_pretrained (safetensors, sharded with an index
above max_shard_size) + generation_config.json + the tokenizer (hf_tokenizer), eos = megalm's EOD.
The output is written to OUT.partial and renamed when complete, then (unless verify=False)
reloaded with AutoModelForCausalLM and its logits compared with megalm's on a fixed input.

from_hf: an HF directory -> ModelConfig + megalm state -> writer.write_checkpoint at T x P.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from megalm.config import Config, ModelConfig
from megalm.convert.hf_names import gpt2_from_hf, gpt2_to_hf, llama_from_hf, llama_to_hf
from megalm.errors import MegalmError
from megalm.model.gpt import resolve_model_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_config(cfg: ModelConfig, tokenizer: Any, dtype: torch.dtype) -> Any:
    """The transformers config of a megalm model; bos/eos/pad from the megalm tokenizer (eos = EOD)."""
    import transformers

    special = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    if cfg.arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
            attention_dropout=cfg.dropout, dtype=dtype, **special,
        )
    if cfg.num_kv_heads != cfg.num_heads:
        raise MegalmError("a gpt2 model with num_kv_heads != num_heads has no GPT2LMHeadModel equivalent")
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_positions=cfg.max_seq_len, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, **special,
    )


def model_config_from_hf(config: Any) -> ModelConfig:
    """ModelConfig of a transformers LlamaConfig / GPT2Config; unsupported features are MegalmErrors."""
    t = config.model_type
    if t == "llama":
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
        _require(rope.get("rope_type", "default") == "default", f"rope scaling {rope.get('rope_type')}")
        _require(config.hidden_act == "silu", f"hidden_act {config.hidden_act}")
        _require(not config.attention_bias and not config.mlp_bias, "attention/MLP biases")
        _require(config.head_dim in (None, config.hidden_size // config.num_attention_heads), "a custom head_dim")
        cfg = ModelConfig(
            arch="llama", hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size,
            max_seq_len=config.max_position_embeddings, norm_eps=config.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]), tie_embeddings=bool(config.tie_word_embeddings), dropout=0.0,
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
    return resolve_model_config(cfg)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise MegalmError(f"this Hugging Face model uses {what}, which megalm's GPT does not implement")


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return llama_to_hf(state, cfg) if cfg.arch == "llama" else gpt2_to_hf(state, cfg)


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state -> megalm GPT state with the tokenizer's vocabulary rows (no padding)."""
    convert = llama_from_hf if cfg.arch == "llama" else gpt2_from_hf
    try:
        return convert(hf, cfg, cfg.vocab_size)
    except KeyError as e:
        raise MegalmError(f"the Hugging Face weights lack {e.args[0]}") from None


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any, out: Path, *,
            dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", extra_meta: dict | None = None) -> None:
    """Write an HF directory atomically (OUT.partial, renamed at the end)."""
    import transformers

    if out.exists() and any(out.iterdir()):
        raise MegalmError(f"output directory {out} exists and is not empty; choose a new one")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(cfg, tokenizer, dtype)
    cls = transformers.LlamaForCausalLM if cfg.arch == "llama" else transformers.GPT2LMHeadModel
    with torch.device("meta"):
        model = cls(config)
    hf_state = {k: v.to(dtype) for k, v in to_hf_state(state, cfg).items()}
    result = model.load_state_dict(hf_state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise MegalmError(f"internal: HF keys missing {missing[:3]} unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad)
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    from megalm.convert.hf_tokenizer import MEGALM_SIDECAR, export_tokenizer

    export_tokenizer(tokenizer, tmp)
    sidecar = tmp / MEGALM_SIDECAR
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **(extra_meta or {})}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def load_hf_dir(hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and megalm state (fp32 is not forced: the file's dtype) of an HF directory."""
    import transformers

    if not (hf_dir / "config.json").is_file():
        raise MegalmError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    cfg = model_config_from_hf(config)
    return cfg, from_hf_state(read_hf_weights(hf_dir), cfg)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model*.safetensors (or, loaded with weights_only=True, pytorch_model*.bin)."""
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("model*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise MegalmError(f"{hf_dir} has no model*.safetensors or pytorch_model*.bin weights")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def verify_hf(out: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> float:
    """Reload `out` with AutoModelForCausalLM; return max |logits - megalm's| on a fixed input (fp32).
    Missing or unexpected keys are an error (transformers v5 would initialise them silently)."""
    import transformers

    from megalm.convert.hf_names import _pad_rows
    from megalm.model.gpt import GPT

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise MegalmError(f"{out}: transformers reports {bad}")
    ours = GPT(cfg, None).eval()
    rounded = {k: v.to(dtype).float() for k, v in state.items()}
    rounded = {k: _pad_rows(v, ours.padded_vocab_size) if k in ("embedding.word.weight", "head.linear.weight") else v
               for k, v in rounded.items()}
    ours.load_state_dict(rounded, strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf.eval()(tokens).logits - ours.logits_full(tokens)).abs().max().item()


def base_config(config_file: str | None, overrides: list[str]) -> Config:
    """The non-model sections of a converted run: a YAML file (optional) plus overrides."""
    from megalm.config import load_config

    cfg = load_config(config_file, overrides)
    if cfg.train.steps == 0 and cfg.train.tokens == 0:
        cfg.train.steps = 1  # a placeholder: set train.steps when resuming
    return cfg


def to_hf(checkpoint: str | Path, output: str | Path, *, dtype: str = "fp32", max_shard_size: str = "5GB",
          verify: bool = True, prefer_master: bool = True) -> dict[str, Any]:
    """Export a megalm checkpoint to an HF directory; return a summary (source, max logit difference)."""
    from megalm.convert.reader import open_checkpoint, read_state

    if dtype not in DTYPES:
        raise MegalmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    ckpt = open_checkpoint(checkpoint)
    state, source = read_state(ckpt, prefer_master)
    cfg = ckpt.config.model
    out = Path(output)
    meta = {"source_checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "weights_from": source}
    save_hf(state, cfg, ckpt.tokenizer(), out, dtype=DTYPES[dtype], max_shard_size=max_shard_size, extra_meta=meta)
    summary = {"output": str(out), "checkpoint": str(ckpt.path), "weights_from": source,
               "parallel": ckpt.meta["parallel"], "step": ckpt.step}
    if verify:
        summary["max_abs_logit_diff"] = diff = verify_hf(out, state, cfg, DTYPES[dtype])
        if not diff <= 1e-4:
            raise MegalmError(f"{out}: HF logits differ from megalm's by {diff:.3g} (> 1e-4); the export is wrong")
    return summary


def from_hf(hf_dir: str | Path, output: str | Path, *, tensor: int = 1, pipeline: int = 1, data_parallel: int = 1,
            config_file: str | None = None, overrides: list[str] = (), tokenizer: bool = True) -> Path:
    """An HF Llama/GPT-2 directory -> RUN_DIR with a step-0 megalm checkpoint at tensor x pipeline."""
    import dataclasses

    from megalm.convert.hf_tokenizer import tokenizer_from_hf_dir
    from megalm.convert.writer import write_checkpoint
    from megalm.data.tokenizer import build_tokenizer

    hf_dir, run_dir = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise MegalmError(f"Hugging Face directory {hf_dir} does not exist")
    model_cfg, state = load_hf_dir(hf_dir)
    cfg = base_config(config_file, [*overrides, f"train.run_dir={run_dir}"])
    cfg.model = dataclasses.replace(model_cfg, init_std=cfg.model.init_std,
                                    activation_checkpointing=cfg.model.activation_checkpointing,
                                    make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by)
    cfg.parallel.tensor, cfg.parallel.pipeline = tensor, pipeline
    info, files = {}, []
    if tokenizer:
        kind, model_file = tokenizer_from_hf_dir(hf_dir, run_dir / "tokenizer")
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = kind, model_file
        tok = build_tokenizer(kind, model_file)
        info, files = tok.describe(), tok.files()
    return write_checkpoint(cfg, {k: v.float() for k, v in state.items()}, run_dir, tokenizer_info=info,
                            tokenizer_files=files, data_parallel=data_parallel)
