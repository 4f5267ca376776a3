"""megalm checkpoints <-> Hugging Face transformers directories (the families of megalm.convert.families).

to_hf: checkpoint -> one fp32 parameter at a time (reader) -> HF names (hf_names) -> safetensors
shards of at most max_shard_size (with transformers' index) + config.json + generation_config.json +
the tokenizer (hf_tokenizer), eos = megalm's EOD: memory holds one parameter and one shard, not the
model. The output is written to OUT.partial and renamed when complete, then (unless verify=False)
reloaded with AutoModelForCausalLM and its logits compared with megalm's on a fixed input: the whole
model when two copies fit in a third of the machine's memory, else its first two blocks.

from_hf: an HF directory -> ModelConfig + megalm state (hf_import) -> a universal checkpoint of the
weights (no optimizer state) -> writer.write_checkpoint at T x P, as reshard goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megalm import seams
from megalm.config import Config, ModelConfig, load_config
from megalm.convert import families
from megalm.convert.hf_import import load_hf_dir
from megalm.convert.hf_tokenizer import MEGALM_SIDECAR, export_tokenizer, tokenizer_from_hf_dir
from megalm.convert.reader import CheckpointReader, open_checkpoint
from megalm.convert.universal import write_universal
from megalm.convert.writer import write_checkpoint
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError
from megalm.inference.load import build_gpt
from megalm.model.flops import count_parameters
from megalm.parallel.dims import ParallelDims
from megalm.parallel.sharding import sharding_specs
from megalm.training.checkpoint_meta import CheckpointMeta, TrainState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_config(cfg: ModelConfig, tokenizer: Any, dtype: torch.dtype) -> Any:
    """The transformers config of a megalm model (its family's class); bos/eos/pad from the megalm
    tokenizer (eos = EOD)."""
    special = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    return families.hf_config(cfg, special, dtype)


def to_hf_tensors(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the HF model, one module at a time (`state` may read lazily)."""
    return families.family_of(cfg).to_hf(state, cfg)


class LazyState(Mapping):
    """GPT name -> full fp32 tensor, read from the checkpoint when asked for (one at a time)."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.full(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.specs)

    def __len__(self) -> int:
        return len(self.reader.specs)


def write_safetensors_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, dtype: torch.dtype,
                             max_shard_bytes: int) -> list[str]:
    """Write tensors into model.safetensors, or model-0000k-of-0000n.safetensors + the index
    transformers reads, starting a new shard whenever the next tensor would pass max_shard_bytes;
    memory holds one shard. Return the tensor names in order."""
    from safetensors.torch import save_file  # noqa: PLC0415 - only conversion needs it

    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size, names, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal current, size
        save_file(current, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        shards.append(dict.fromkeys(current))
        current, size = {}, 0

    for name, tensor in tensors:
        tensor = tensor.to(dtype).contiguous()
        if current and size + tensor.nbytes > max_shard_bytes:
            flush()
        current[name], size = tensor, size + tensor.nbytes
        names.append(name)
    flush()
    total = len(shards)
    for i, shard in enumerate(shards):
        final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out / f"shard-{i:05d}.tmp").rename(out / final)
        weight_map.update(dict.fromkeys(shard, final))
    if total > 1:
        nbytes = sum((out / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (transformers' max_shard_size spelling)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not found:
        raise MegalmError(f"--max-shard-size {text!r}: give a size like 5GB or 500MiB")
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2)])


def save_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any, out: Path, *,
            dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", extra_meta: dict | None = None) -> None:
    """Write an HF directory atomically (OUT.partial, renamed at the end), the weights streamed from
    `state` one module at a time into shards of at most max_shard_size."""
    import transformers  # noqa: PLC0415 - heavy

    if out.exists() and any(out.iterdir()):
        raise MegalmError(f"output directory {out} exists and is not empty; choose a new one")
    families.family_of(cfg)  # model.family=none: refused before anything is written
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(cfg, tokenizer, dtype)
    cls = families.hf_model_class(cfg)
    config.save_pretrained(str(tmp))
    transformers.GenerationConfig(bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eod,
                                  pad_token_id=tokenizer.pad).save_pretrained(str(tmp))
    names = write_safetensors_shards(to_hf_tensors(state, cfg), tmp, dtype, parse_size(max_shard_size))
    with torch.device("meta"):
        expected = [k for k in cls(config).state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")]
    expected = families.family_of(cfg).saved_names(expected, cfg)  # MoE: the per-expert names files hold
    if sorted(names) != sorted(expected):
        raise MegalmError(f"internal: HF keys missing {sorted(set(expected) - set(names))[:3]} "
                          f"unexpected {sorted(set(names) - set(expected))[:3]}")
    export_tokenizer(tokenizer, tmp)
    sidecar = tmp / MEGALM_SIDECAR
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **(extra_meta or {})}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)


VERIFY_SUBSET_BLOCKS = 2
"""Blocks the logits check compares when the model is too large to hold twice (see verify_hf)."""


def verify_layers(cfg: ModelConfig) -> int:
    """All blocks when two fp32 copies of the model (transformers' and megalm's) fit in a third of
    this machine's memory, else the first VERIFY_SUBSET_BLOCKS: every kind of tensor and mapping is
    checked, and an off-by-one layer mapping shows (block 0 would hold block 1's weights)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    two_copies = 2 * 4 * count_parameters(cfg)
    return cfg.num_layers if two_copies <= total // 3 else min(VERIFY_SUBSET_BLOCKS, cfg.num_layers)


def verify_hf(out: Path, state: Mapping[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
              layers: int | None = None) -> tuple[float, str]:
    """Reload `out` with AutoModelForCausalLM; return (max |logits - megalm's| on a fixed input in
    fp32, what was compared). With `layers` < the model's blocks, both sides are truncated to the first
    `layers` blocks (transformers reads only those tensors). A missing or mismatched key is an error
    (transformers v5 would initialise it silently)."""
    import transformers  # noqa: PLC0415 - heavy

    layers = verify_layers(cfg) if layers is None else min(layers, cfg.num_layers)
    config = transformers.AutoConfig.from_pretrained(str(out))
    config.num_hidden_layers = layers
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), config=config, output_loading_info=True, **seams.dtype_kwargs(torch.float32))
    unexpected = [k for k in info.get("unexpected_keys", ()) if not _in_later_block(k, layers)]
    bad = {k: sorted(v) for k, v in (("missing_keys", info.get("missing_keys")), ("unexpected_keys", unexpected),
                                     ("mismatched_keys", info.get("mismatched_keys"))) if v}
    if bad:
        raise MegalmError(f"{out}: transformers reports {bad}")
    small = dataclasses.replace(cfg, num_layers=layers)
    ours = build_gpt(small, {name: state[name].to(dtype) for name in sharding_specs(small)})  # the export's rounding
    tokens = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - ours.logits_full(tokens)).abs().max().item()
    return diff, f"all {cfg.num_layers} blocks" if layers == cfg.num_layers else f"blocks 0-{layers - 1} of {cfg.num_layers}"


def _in_later_block(hf_name: str, layers: int) -> bool:
    found = re.search(r"\.(?:layers|h)\.(\d+)\.", hf_name)
    return found is not None and int(found.group(1)) >= layers


def base_config(config_file: str | None, overrides: list[str]) -> Config:
    """The non-model sections of a converted run: a YAML file (optional) plus overrides."""
    cfg = load_config(config_file, overrides)
    if cfg.train.steps == 0 and cfg.train.tokens == 0:
        cfg.train.steps = 1  # a placeholder: set train.steps when resuming
    return cfg


def to_hf(checkpoint: str | Path, output: str | Path, *, dtype: str = "fp32", max_shard_size: str = "5GB",
          verify: bool = True, prefer_master: bool = True, verify_layers: int | None = None) -> dict[str, Any]:
    """Export a megalm checkpoint to an HF directory; return a summary (source, max logit difference)."""
    if dtype not in DTYPES:
        raise MegalmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    ckpt = open_checkpoint(checkpoint)
    reader = CheckpointReader(ckpt, prefer_master)
    state, source = LazyState(reader), reader.source
    cfg = ckpt.config.model
    out = Path(output)
    meta = {"source_checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "weights_from": source}
    save_hf(state, cfg, ckpt.tokenizer(), out, dtype=DTYPES[dtype], max_shard_size=max_shard_size, extra_meta=meta)
    summary = {"output": str(out), "checkpoint": str(ckpt.path), "weights_from": source,
               "parallel": dataclasses.asdict(ckpt.meta.dims), "step": ckpt.step}
    if verify:
        diff, summary["verified"] = verify_hf(out, state, cfg, DTYPES[dtype], verify_layers)
        summary["max_abs_logit_diff"] = diff
        if not diff <= 1e-4:
            raise MegalmError(f"{out}: HF logits differ from megalm's by {diff:.3g} (> 1e-4); the export is wrong")
    return summary


def from_hf(hf_dir: str | Path, output: str | Path, *, tensor: int = 1, pipeline: int = 1, data_parallel: int = 1,
            expert: int = 1,
            config_file: str | None = None, overrides: list[str] = (), tokenizer: bool = True) -> Path:
    """An HF directory (a family of megalm.convert.families) -> RUN_DIR with a step-0 megalm checkpoint at tensor x pipeline."""
    hf_dir, run_dir = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise MegalmError(f"Hugging Face directory {hf_dir} does not exist")
    model_cfg, state = load_hf_dir(hf_dir)
    created = not run_dir.exists()
    try:
        return _write_from_hf(hf_dir, run_dir, model_cfg, state, (tensor, pipeline, data_parallel, expert),
                              config_file, overrides, tokenizer)
    except BaseException:
        if created:  # nothing half-written that looks like a run
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _write_from_hf(hf_dir: Path, run_dir: Path, model_cfg: ModelConfig, state: dict[str, torch.Tensor],
                   layout: tuple[int, int, int, int], config_file: str | None, overrides: list[str],
                   tokenizer: bool) -> Path:
    """`layout`: tensor, pipeline, data parallel, expert parallel."""
    tensor, pipeline, data_parallel, expert = layout
    cfg = base_config(config_file, [*overrides, f"train.run_dir={run_dir}"])
    cfg.model = dataclasses.replace(model_cfg, init_std=cfg.model.init_std,
                                    activation_checkpointing=cfg.model.activation_checkpointing,
                                    make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by)
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert = tensor, pipeline, expert
    info, files = {}, []
    if tokenizer:
        kind, model_file = tokenizer_from_hf_dir(hf_dir, run_dir / "tokenizer")
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = kind, model_file
        tok = build_tokenizer(kind, model_file)
        if tok.vocab_size > model_cfg.vocab_size:
            raise MegalmError(f"{hf_dir}: the tokenizer's {tok.vocab_size} ids do not fit the model's vocabulary of "
                              f"{model_cfg.vocab_size} (vocab_size in config.json); is it the model's own tokenizer?")
        info, files = tok.describe(), tok.files()
    meta = CheckpointMeta.of_run(cfg, ParallelDims(tensor=1, pipeline=1, data=1), TrainState(), info)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megalm-universal-", dir=run_dir) as tmp:
        weights = ((name, {"fp32": value.float()}) for name, value in state.items())
        universal = write_universal(Path(tmp) / "u", meta, weights, 0.0, files)
        return write_checkpoint(cfg, universal, run_dir, tokenizer_files=files, data_parallel=data_parallel)
