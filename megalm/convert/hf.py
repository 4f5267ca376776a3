"""megalm checkpoints <-> Hugging Face transformers directories (Llama and GPT-2).

to_hf: checkpoint -> unsharded fp32 state (reader) -> HF names (hf_names) -> LlamaForCausalLM /
GPT2LMHeadModel built on the meta device -> save_pretrained (safetensors, sharded with an index
above max_shard_size) + generation_config.json + the tokenizer (hf_tokenizer), eos = megalm's EOD.
The output is written to OUT.partial and renamed when complete, then (unless verify=False)
reloaded with AutoModelForCausalLM and its logits compared with megalm's on a fixed input.

from_hf: an HF directory -> ModelConfig + megalm state (hf_import) -> a universal checkpoint of the
weights (no optimizer state) -> writer.write_checkpoint at T x P, as reshard goes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from megalm import seams
from megalm.config import Config, ModelConfig, load_config
from megalm.convert.hf_import import load_hf_dir
from megalm.convert.hf_names import gpt2_to_hf, llama_to_hf
from megalm.convert.hf_tokenizer import MEGALM_SIDECAR, export_tokenizer, tokenizer_from_hf_dir
from megalm.convert.reader import open_checkpoint, read_state
from megalm.convert.universal import write_universal
from megalm.convert.writer import write_checkpoint
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError
from megalm.inference.load import build_gpt
from megalm.parallel.dims import ParallelDims
from megalm.training.checkpoint_meta import CheckpointMeta, TrainState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_config(cfg: ModelConfig, tokenizer: Any, dtype: torch.dtype) -> Any:
    """The transformers config of a megalm model; bos/eos/pad from the megalm tokenizer (eos = EOD)."""
    import transformers  # noqa: PLC0415 - heavy

    special = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    if cfg.arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            **seams.rope_kwargs(cfg.rope_theta), hidden_act="silu",
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
            attention_dropout=cfg.dropout, **seams.dtype_kwargs(dtype), **special,
        )
    if cfg.num_kv_heads != cfg.num_heads:
        raise MegalmError("a gpt2 model with num_kv_heads != num_heads has no GPT2LMHeadModel equivalent")
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_positions=cfg.max_seq_len, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, **seams.dtype_kwargs(dtype), **special,
    )


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return llama_to_hf(state, cfg) if cfg.arch == "llama" else gpt2_to_hf(state, cfg)


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any, out: Path, *,
            dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", extra_meta: dict | None = None) -> None:
    """Write an HF directory atomically (OUT.partial, renamed at the end)."""
    import transformers  # noqa: PLC0415 - heavy

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
    export_tokenizer(tokenizer, tmp)
    sidecar = tmp / MEGALM_SIDECAR
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **(extra_meta or {})}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def verify_hf(out: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> float:
    """Reload `out` with AutoModelForCausalLM; return max |logits - megalm's| on a fixed input (fp32).
    Missing or unexpected keys are an error (transformers v5 would initialise them silently)."""
    import transformers  # noqa: PLC0415 - heavy

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True, **seams.dtype_kwargs(torch.float32))
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise MegalmError(f"{out}: transformers reports {bad}")
    ours = build_gpt(cfg, {k: v.to(dtype) for k, v in state.items()})  # the export's rounding, in fp32
    tokens = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf.eval()(tokens).logits - ours.logits_full(tokens)).abs().max().item()


def base_config(config_file: str | None, overrides: list[str]) -> Config:
    """The non-model sections of a converted run: a YAML file (optional) plus overrides."""
    cfg = load_config(config_file, overrides)
    if cfg.train.steps == 0 and cfg.train.tokens == 0:
        cfg.train.steps = 1  # a placeholder: set train.steps when resuming
    return cfg


def to_hf(checkpoint: str | Path, output: str | Path, *, dtype: str = "fp32", max_shard_size: str = "5GB",
          verify: bool = True, prefer_master: bool = True) -> dict[str, Any]:
    """Export a megalm checkpoint to an HF directory; return a summary (source, max logit difference)."""
    if dtype not in DTYPES:
        raise MegalmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    ckpt = open_checkpoint(checkpoint)
    state, source = read_state(ckpt, prefer_master)
    cfg = ckpt.config.model
    out = Path(output)
    meta = {"source_checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "weights_from": source}
    save_hf(state, cfg, ckpt.tokenizer(), out, dtype=DTYPES[dtype], max_shard_size=max_shard_size, extra_meta=meta)
    summary = {"output": str(out), "checkpoint": str(ckpt.path), "weights_from": source,
               "parallel": dataclasses.asdict(ckpt.meta.dims), "step": ckpt.step}
    if verify:
        summary["max_abs_logit_diff"] = diff = verify_hf(out, state, cfg, DTYPES[dtype])
        if not diff <= 1e-4:
            raise MegalmError(f"{out}: HF logits differ from megalm's by {diff:.3g} (> 1e-4); the export is wrong")
    return summary


def from_hf(hf_dir: str | Path, output: str | Path, *, tensor: int = 1, pipeline: int = 1, data_parallel: int = 1,
            config_file: str | None = None, overrides: list[str] = (), tokenizer: bool = True) -> Path:
    """An HF Llama/GPT-2 directory -> RUN_DIR with a step-0 megalm checkpoint at tensor x pipeline."""
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
    meta = CheckpointMeta.of_run(cfg, ParallelDims(tensor=1, pipeline=1, data=1), TrainState(), info)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megalm-universal-", dir=run_dir) as tmp:
        weights = ((name, {"fp32": value.float()}) for name, value in state.items())
        universal = write_universal(Path(tmp) / "u", meta, weights, 0.0, files)
        return write_checkpoint(cfg, universal, run_dir, tokenizer_files=files, data_parallel=data_parallel)
