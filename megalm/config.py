"""Typed run configuration: one dataclass per component, strict YAML, dotted overrides.

A run is one YAML file with the sections below. Loading is strict: an unknown key, a duplicate key
or a value of the wrong type is a `MegalmError` naming the key. `key=value` overrides on the command
line are parsed as YAML and coerced to the field's type (`parallel.tensor=2`,
`optimizer.betas=[0.9,0.95]`). `Config.validate(world_size)` computes every derived value (data
parallel size, gradient accumulation, defaults that depend on other keys) so that the resolved
config written into the run directory is complete and loads back equal.

Each field's docstring is the string literal that follows it; `describe()` collects them for
README and `--help-config`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megalm.errors import MegalmError


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    """Architecture family: llama (RMSNorm, RoPE, SwiGLU, no biases) or gpt2 (LayerNorm, learned
    positions, tanh-GELU, biases)."""
    hidden_size: int = 256
    """Model width d."""
    num_layers: int = 4
    """Number of transformer blocks L."""
    num_heads: int = 4
    """Attention (query) heads; hidden_size must divide by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (1 = multi-query). Default: num_heads."""
    ffn_hidden_size: int | None = None
    """MLP inner width. Default: 4*d for gpt2; for llama 8/3*d rounded up to a multiple of 256 (as Meta's Llama)."""
    vocab_size: int = 32000
    """The tokenizer's vocabulary size. Padding for tensor parallelism is internal and never exported."""
    make_vocab_size_divisible_by: int = 64
    """The embedding table is padded to a multiple of this times the tensor-parallel size."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of gpt2's position table; RoPE cache for llama)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm/LayerNorm (Hugging Face Llama uses 1e-6, Megatron and GPT-2 1e-5)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output head. Default: true for gpt2, false for llama."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections use
    init_std / sqrt(2 * num_layers) (GPT-2's scaled residual init)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (pretraining usually uses 0)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    loss_chunk_tokens: int = 1024
    """Fused output layer + cross entropy, this many tokens at a time: the logits of a whole micro
    batch (and their fp32 softmax) never exist. 0: compute all the logits, then the loss."""


@dataclass(kw_only=True)
class DataConfig:
    tokenizer_type: Literal["byte", "sentencepiece", "hf"] = "byte"
    """byte needs no file; sentencepiece reads a .model; hf reads a tokenizer.json (byte-level BPE)."""
    tokenizer_model: str = ""
    """Path of the tokenizer file (empty for byte)."""
    train_prefixes: list[Any] = field(default_factory=list)
    """Shard prefixes (PREFIX.bin/.idx), or [weight, prefix] pairs for a weighted blend."""
    split: str = "98,1,1"
    """Train/validation/test split of each prefix's documents, as relative weights."""
    seq_len: int | None = None
    """Tokens per training sample. Default: model.max_seq_len."""
    cache_dir: str = ""
    """Where sample indices are cached as .npy. Default: RUN_DIR/data_cache."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 loads in the training process)."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (Megatron-style; ranks adjacent, the innermost axis)."""
    pipeline: int = 1
    """Pipeline-parallel stages (DeepSpeed PipelineModule). Data parallel = world / (tensor * pipeline)."""
    sequence_parallel: bool = False
    """Shard norms and dropout along the sequence across the tensor axis (needs tensor > 1 to matter)."""
    pipeline_partition: str = "parameters"
    """How DeepSpeed splits layers across stages: parameters, uniform, or type:REGEX."""
    init_timeout_minutes: float = 10.0
    """Timeout of process-group creation and of each collective."""


@dataclass(kw_only=True)
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded over data parallel."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states and the update on the CPU (stages 1-3)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward pass (useful on GPU)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay for matrices; norms, biases and embeddings are not decayed."""
    decay_embeddings: bool = False
    """Also apply weight decay to the embedding and output head."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over every parallel axis) to this; 0 disables clipping."""


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    """cosine: warmup then cosine to min_lr; constant: warmup then lr; wsd: warmup, stable, linear
    decay to min_lr over the last decay_steps."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    decay_steps: int | None = None
    """cosine: steps of the cosine after warmup (default: the rest of training); wsd: steps of the
    final decay (default: 20% of training); unused by constant."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 0
    """Optimizer steps to train; exactly one of steps and tokens is set (>0)."""
    tokens: int = 0
    """Train for this many tokens instead: steps = ceil(tokens / (global_batch_size * seq_len))."""
    micro_batch_size: int = 1
    """Samples per rank per forward pass."""
    global_batch_size: int | None = None
    """Samples per optimizer step = micro_batch_size * grad_accum_steps * data-parallel size.
    Default: micro_batch_size * data-parallel size (no accumulation)."""
    grad_accum_steps: int | None = None
    """Derived from global_batch_size; setting both must agree."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision. bf16/fp16 keep fp32 master weights; fp16 uses dynamic loss scaling."""
    seed: int = 1234
    """Seeds initialisation, dropout and the data order."""
    run_dir: str = "runs/default"
    """Holds config.yaml, metrics.jsonl, tensorboard/ and checkpoints/."""
    log_interval: int = 1
    """Log every N steps."""
    eval_interval: int = 0
    """Evaluate on the validation split every N steps (0: never)."""
    eval_steps: int = 10
    """Validation batches per evaluation."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss (each one is skipped)."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's engine.compile()): faster steps after a slow first one."""


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Keep the newest K checkpoints (0 keeps all)."""
    load: str = "auto"
    """auto: resume from RUN_DIR/checkpoints/latest if present; none: start fresh; or a path to a
    checkpoint directory (global_stepN or its parent)."""
    save_at_end: bool = True
    """Save after the last step."""
    reset_optimizer: bool = False
    """On resume, load weights, step, schedule and data position but start a fresh optimizer
    state. Needed to resume a ZeRO-1/2 checkpoint with another data-parallel size (DeepSpeed
    partitions optimizer states by data-parallel rank)."""


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write scalars to RUN_DIR/tensorboard."""
    console: bool = True
    """Print a line per logged step on rank 0."""
    peak_tflops: float = 0.0
    """Per-device peak bf16 TFLOP/s for MFU. 0: from the device table (A100, H100, H200); on CPU
    MFU is reported only when this is set."""
    sample_ids: bool = False
    """Append the global sample ids each data-parallel rank trains on to
    RUN_DIR/sample_ids/rank{R}.jsonl (a data-order audit; used by the resume tests)."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "zero": ZeroConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(kw_only=True)
class Config:
    """The whole run. `validate()` fills derived values; `data_parallel` is derived, never set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int) -> Config:
        """Check consistency and compute derived values in place; return self. Idempotent."""
        validate_config(self, world_size)
        return self

    @property
    def data_parallel(self) -> int:
        """Data-parallel size implied by the validated batch settings."""
        t = self.train
        if t.global_batch_size is None or t.grad_accum_steps is None:
            raise MegalmError("config not validated yet: call validate(world_size)")
        return t.global_batch_size // (t.micro_batch_size * t.grad_accum_steps)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- strict YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise MegalmError(f"duplicate key '{key}' at line {line} of {node.start_mark.name}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise MegalmError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise a MegalmError naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MegalmError:
                continue
        raise MegalmError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise MegalmError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise MegalmError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise MegalmError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MegalmError(f"section '{name}' must be a mapping of keys, got {raw!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        raise MegalmError(
            f"unknown key '{name}.{unknown[0]}'; valid keys of '{name}': {', '.join(types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{name}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build a Config from nested dicts, strictly (unknown sections/keys and wrong types are errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MegalmError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise MegalmError(
            f"{source}: unknown section '{unknown[0]}'; valid sections: {', '.join(SECTIONS)}"
        )
    return Config(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to nested dicts; return them."""
    for item in overrides:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise MegalmError(f"override '{item}' must look like section.key=value")
        section, key = parts
        if section not in SECTIONS:
            raise MegalmError(
                f"override '{item}': unknown section '{section}'; valid: {', '.join(SECTIONS)}"
            )
        value = _parse_yaml(text, f"override '{item}'") if text.strip() else ""
        sec = raw.setdefault(section, {})
        if sec is None:
            sec = raw[section] = {}
        sec[key] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or defaults when path is None) strictly and apply dotted overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MegalmError(f"config file not found: {p}")
        raw = _parse_yaml(p.read_text(encoding="utf-8"), str(p)) or {}
        if not isinstance(raw, dict):
            raise MegalmError(f"{p}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, list(overrides)), str(path or "config"))


def describe() -> dict[str, dict[str, str]]:
    """Every key's documentation, read from the string literal after each field."""
    out: dict[str, dict[str, str]] = {}
    for name, cls in SECTIONS.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs: dict[str, str] = {}
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
        out[name] = docs
    return out


def describe_markdown() -> str:
    """docs/config.md: every section and key with its type, default and documentation."""
    lines = ["# Configuration reference", "",
             "Generated from megalm/config.py by `python -m megalm.train --help-config --markdown`;",
             "tests/test_config.py fails when it is out of date. Derived defaults are resolved by",
             "`Config.validate(world_size)` and written into RUN_DIR/config.yaml.", ""]
    docs = describe()
    for name, cls in SECTIONS.items():
        lines += [f"## {name}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        defaults = dataclasses.asdict(cls())
        for key, tp in _field_types(cls).items():
            if typing.get_origin(tp) is Literal:
                type_name = "one of " + ", ".join(map(repr, typing.get_args(tp)))
            else:
                type_name = _type_name(tp).replace("|", "or")
            default = "derived" if defaults[key] is None else repr(defaults[key])
            lines.append(f"| `{name}.{key}` | {type_name} | {default} | {docs[name].get(key, '')} |")
        lines.append("")
    return "\n".join(lines)


# Validation lives in its own module; these names stay importable from megalm.config.
from megalm.config_validation import ceil_div, parse_split, validate_config  # noqa: E402

__all__ = [
    "SECTIONS", "Config", "apply_overrides", "ceil_div", "config_from_dict", "describe", "describe_markdown",
    "load_config", "parse_split",
]
