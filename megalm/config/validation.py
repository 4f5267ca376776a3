"""Consistency checks and derived values of a Config (called by Config.validate).

Each check raises a MegalmError whose message names the keys and the fix. Derived values (data
parallel size, gradient accumulation, steps from tokens, sequence length, cache directory) are
written into the config, so the resolved config is complete and validate() is idempotent. (The
model's own derived defaults are filled when a ModelConfig is constructed.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from megalm.config.values import ceil_div, parse_split
from megalm.errors import MegalmError
from megalm.parallel.dims import ParallelDims

if TYPE_CHECKING:  # the schema imports this module to validate itself
    from megalm.config.schema import Config, ModelConfig


def validate_config(cfg: Config, world_size: int) -> None:
    validate_model(cfg.model)
    _validate_parallel(cfg, world_size)
    _validate_batch(cfg, world_size)
    _validate_rest(cfg)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MegalmError(message)


def validate_model(m: ModelConfig) -> None:
    """Check the model's shape (its derived defaults were filled when it was constructed)."""
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_seq_len"):
        _check(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _check(m.make_vocab_size_divisible_by > 0, "model.make_vocab_size_divisible_by must be positive")
    _check(m.head_dim is not None, f"model.hidden_size ({m.hidden_size}) must divide by model.num_heads "
                                   f"({m.num_heads}), or set model.head_dim")
    _check(m.head_dim > 0, f"model.head_dim must be positive, got {m.head_dim}")
    _check(
        0 < m.num_kv_heads <= m.num_heads and m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})",
    )
    if m.arch == "llama":
        _check(m.head_dim % 2 == 0, f"llama needs an even model.head_dim for RoPE, got {m.head_dim}")
    _check(m.sliding_window >= 0, f"model.sliding_window must be >= 0 (0: no window), got {m.sliding_window}")
    _check(not m.sliding_window or m.dropout == 0.0,
           f"model.sliding_window needs model.dropout=0 (got {m.dropout}): FlexAttention has no attention dropout")
    if m.moe_num_experts:
        _validate_moe(m)
    check_family(m)
    _check(m.ffn_hidden_size > 0, "model.ffn_hidden_size must be positive")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.init_std > 0, "model.init_std must be positive")
    _check(not m.document_positions or m.document_mask,
           "model.document_positions restarts positions at each document and needs model.document_mask=true")
    _check(not m.document_mask or m.dropout == 0.0,
           f"model.document_mask needs model.dropout=0 (got {m.dropout}): FlexAttention has no attention dropout")
    if m.rope_scaling != "none":
        _check(m.arch == "llama", f"model.rope_scaling={m.rope_scaling} needs arch llama (gpt2 has no RoPE)")
        _check(m.rope_factor > 0 and m.rope_original_max_seq_len > 0,
               f"model.rope_scaling={m.rope_scaling} needs model.rope_factor > 0 and model.rope_original_max_seq_len "
               f"> 0 (the pretraining context), got {m.rope_factor} and {m.rope_original_max_seq_len}")
        _check(m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor,
               f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) must exceed model.rope_low_freq_factor "
               f"({m.rope_low_freq_factor})")


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe_num_experts
    _check(e > 0, f"model.moe_num_experts must be >= 0 (0: dense), got {e}")
    _check(m.arch == "llama", "model.moe_num_experts needs arch llama (SwiGLU experts)")
    _check(0 < m.moe_top_k <= e, f"model.moe_top_k ({m.moe_top_k}) must be in 1..model.moe_num_experts ({e})")
    _check(m.moe_ffn_hidden_size > 0, "model.moe_ffn_hidden_size must be positive")
    _check(m.moe_layer_freq > 0, f"model.moe_layer_freq must be positive, got {m.moe_layer_freq}")
    outside = [i for i in m.moe_dense_layers if not (isinstance(i, int) and 0 <= i < m.num_layers)]
    _check(not outside, f"model.moe_dense_layers {outside} outside the model's blocks 0..{m.num_layers - 1}")
    _check(m.moe_router_scale > 0, "model.moe_router_scale must be positive")
    _check(m.moe_bias_update_rate >= 0, "model.moe_bias_update_rate must not be negative")
    _check(m.moe_capacity_factor >= 0, f"model.moe_capacity_factor must be >= 0 (0: dropless), got {m.moe_capacity_factor}")
    _check(m.moe_shared_expert_size >= 0, "model.moe_shared_expert_size must not be negative")
    _check(not m.moe_shared_expert_gate or m.moe_shared_expert_size > 0,
           "model.moe_shared_expert_gate needs model.moe_shared_expert_size > 0")
    _check(m.moe_aux_loss_coeff >= 0 and m.moe_z_loss_coeff >= 0,
           "model.moe_aux_loss_coeff and model.moe_z_loss_coeff must not be negative")


def check_family(m: ModelConfig) -> None:
    """model.family names a family whose transformers class has exactly the model's features."""
    from megalm.convert.families import family_mismatch  # noqa: PLC0415 - the families import the config

    problem = family_mismatch(m)
    _check(problem is None, f"model.family={m.family}: {problem}")


def _validate_parallel(cfg: Config, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    if p.expert > 1:
        _check(m.moe_num_experts > 0, f"parallel.expert={p.expert} needs a mixture of experts (model.moe_num_experts > 0)")
        _check(m.moe_num_experts % p.expert == 0, f"model.moe_num_experts ({m.moe_num_experts}) must divide by "
                                                  f"parallel.expert ({p.expert}): each rank holds the same number of experts")
        _check(cfg.zero.stage <= 2, f"parallel.expert={p.expert} with zero.stage=3 is not supported: DeepSpeed's "
                                    "ZeRO-3 does not partition megalm's experts over their own ranks; use zero.stage 0, 1 or 2")
    ParallelDims.from_config(p, world_size)
    t, c = p.tensor, p.context
    heads_by = f"parallel.tensor ({t})" if c == 1 else f"parallel.tensor x parallel.context ({t} x {c} = {t * c})"
    _check(m.num_heads % (t * c) == 0, f"model.num_heads ({m.num_heads}) must divide by {heads_by}")
    _check(
        m.num_kv_heads % (t * c) == 0,
        f"model.num_kv_heads ({m.num_kv_heads}) must divide by {heads_by}: "
        f"use sizes whose product divides the kv heads, or more kv heads",
    )
    if c > 1:
        _check(p.pipeline == 1, f"parallel.context={c} with parallel.pipeline={p.pipeline} is not supported: "
                                "use tensor x context x data parallelism, or pipeline without context")
        _check(m.dropout == 0.0, f"parallel.context={c} needs model.dropout=0 (got {m.dropout}): dropout "
                                 "under context parallelism is not supported")
    _check(
        m.ffn_hidden_size % t == 0,
        f"model.ffn_hidden_size ({m.ffn_hidden_size}) must divide by parallel.tensor ({t})",
    )
    if m.moe_num_experts:
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_size"):
            _check(getattr(m, key) % t == 0, f"model.{key} ({getattr(m, key)}) must divide by parallel.tensor ({t})")
    _check(
        p.pipeline <= m.num_layers,
        f"parallel.pipeline ({p.pipeline}) exceeds model.num_layers ({m.num_layers})",
    )
    z = cfg.zero
    if p.pipeline > 1:
        _check(
            z.stage <= 1,
            f"zero.stage={z.stage} with parallel.pipeline={p.pipeline}: DeepSpeed's pipeline engine "
            "supports ZeRO 0 and 1 only; set zero.stage=1",
        )
        _check(
            not (z.stage == 0 and cfg.train.precision == "bf16"),
            "bf16 pipeline with zero.stage=0 trains but its checkpoints fail to reload in DeepSpeed; "
            "set zero.stage=1",
        )
    _check(not (z.offload_optimizer and z.stage == 0), "zero.offload_optimizer needs zero.stage >= 1")
    _check(p.init_timeout_minutes > 0 and p.collective_timeout_minutes > 0,
           "parallel.init_timeout_minutes and parallel.collective_timeout_minutes must be positive")


def _validate_batch(cfg: Config, world_size: int) -> None:
    t, d, m = cfg.train, cfg.data, cfg.model
    p = cfg.parallel
    dp = world_size // (p.tensor * p.context * p.pipeline)
    if d.seq_len is None:
        d.seq_len = m.max_seq_len
    _check(0 < d.seq_len <= m.max_seq_len, f"data.seq_len ({d.seq_len}) must be in 1..model.max_seq_len ({m.max_seq_len})")
    chunks = p.context * (p.tensor if p.sequence_parallel else 1)
    if chunks > 1:
        by = (f"parallel.context x parallel.tensor ({p.context} x {p.tensor} = {chunks}) under sequence parallelism"
              if p.sequence_parallel and p.context > 1 else
              f"parallel.tensor ({p.tensor}) under sequence parallelism" if p.sequence_parallel else
              f"parallel.context ({p.context})")
        _check(d.seq_len % chunks == 0, f"data.seq_len ({d.seq_len}) must divide by {by}: each rank holds an "
                                        "equal chunk of every sequence")
    _check(t.micro_batch_size > 0, "train.micro_batch_size must be positive")
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        t.global_batch_size = per_step * (t.grad_accum_steps or 1)
    _check(
        t.global_batch_size > 0 and t.global_batch_size % per_step == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size x "
        f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}",
    )
    accum = t.global_batch_size // per_step
    _check(
        t.grad_accum_steps in (None, accum),
        f"train.grad_accum_steps ({t.grad_accum_steps}) disagrees with global_batch_size / "
        f"(micro_batch_size x data parallel) = {t.global_batch_size} / {per_step} = {accum}; "
        "set only one of them",
    )
    t.grad_accum_steps = accum
    _check(t.steps >= 0 and t.tokens >= 0, "train.steps and train.tokens must not be negative")
    _check(t.steps > 0 or t.tokens > 0, "set train.steps or train.tokens to a positive number")
    if t.tokens > 0:
        steps = ceil_div(t.tokens, t.global_batch_size * d.seq_len)
        _check(
            t.steps in (0, steps),
            f"train.steps ({t.steps}) disagrees with train.tokens ({t.tokens}) = {steps} steps; set one",
        )
        t.steps = steps


def _validate_muon(cfg: Config) -> None:
    from megalm.config.schema import OptimizerConfig  # noqa: PLC0415 - the schema imports this module

    o = cfg.optimizer
    if o.name != "muon":
        changed = [f.name for f in dataclasses.fields(o) if f.name.startswith("muon_")
                   and getattr(o, f.name) != getattr(OptimizerConfig(), f.name)]
        _check(not changed, f"optimizer.{changed[0] if changed else ''} is a Muon key but optimizer.name is {o.name}: "
                            "set optimizer.name=muon, or remove it")
        return
    _check(isinstance(o.muon_ns_steps, int) and o.muon_ns_steps >= 1,
           f"optimizer.muon_ns_steps must be at least 1, got {o.muon_ns_steps}")
    _check(len(o.muon_ns_coefficients) == 3, "optimizer.muon_ns_coefficients must be the quintic's three numbers (a, b, c)")
    _check(0 <= o.muon_momentum < 1 and o.muon_update_rms > 0,
           "optimizer.muon_momentum must be in [0, 1) and optimizer.muon_update_rms positive")
    _check(cfg.zero.stage <= 2, "optimizer.name=muon with zero.stage=3 is not supported: ZeRO-3 hands the optimizer "
                                "partitions of every parameter, and Muon needs whole matrices; use zero.stage 0, 1 or 2")


def _validate_rest(cfg: Config) -> None:
    t, s, d, o = cfg.train, cfg.schedule, cfg.data, cfg.optimizer
    _check(0 <= s.warmup_steps <= t.steps, f"schedule.warmup_steps ({s.warmup_steps}) must be in 0..train.steps")
    if s.decay_steps is None:
        s.decay_steps = t.steps - s.warmup_steps if s.kind != "wsd" else max(1, t.steps // 5)
    _check(s.decay_steps >= 0, "schedule.decay_steps must not be negative")
    if s.kind == "wsd":
        _check(
            s.warmup_steps + s.decay_steps <= t.steps,
            f"schedule: warmup_steps + decay_steps ({s.warmup_steps} + {s.decay_steps}) exceed train.steps ({t.steps})",
        )
    _check(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be in 0..optimizer.lr ({o.lr})")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas must be two numbers in [0, 1)")
    _check(o.grad_clip >= 0 and o.weight_decay >= 0, "optimizer.grad_clip and weight_decay must not be negative")
    _validate_muon(cfg)
    if d.tokenizer_type != "byte":
        _check(bool(d.tokenizer_model), f"data.tokenizer_type={d.tokenizer_type} needs data.tokenizer_model")
    parse_split(d.split)
    for i, entry in enumerate(d.train_prefixes):
        ok = isinstance(entry, str) or (
            isinstance(entry, list) and len(entry) == 2
            and isinstance(entry[0], (int, float)) and entry[0] > 0 and isinstance(entry[1], str)
        )
        _check(ok, f"data.train_prefixes[{i}] must be a prefix or a [weight, prefix] pair, got {entry!r}")
    last = 0
    for i, entry in enumerate(d.mixture_schedule):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and last < entry[0]
              and isinstance(entry[1], list) and len(entry[1]) > 0
              and all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (int, float)) and pair[0] > 0
                      and isinstance(pair[1], str) for pair in entry[1]))
        _check(ok, f"data.mixture_schedule[{i}] must be [step, [[weight, prefix], ...]] with positive weights and "
                   f"a step after {last} (step 0 is data.train_prefixes; steps increasing), got {entry!r}")
        last = entry[0]
    if not d.cache_dir:
        d.cache_dir = str(Path(t.run_dir) / "data_cache")
    _check(d.num_workers >= 0, "data.num_workers must not be negative")
    for key in ("log_interval", "eval_steps", "max_nonfinite_steps"):
        _check(getattr(t, key) > 0, f"train.{key} must be positive")
    _check(t.eval_interval >= 0, "train.eval_interval must not be negative")
    _check(t.eval_tasks_interval >= 0 and t.eval_tasks_limit >= 0,
           "train.eval_tasks_interval and train.eval_tasks_limit must not be negative")
    if t.eval_tasks and t.eval_tasks_interval:
        p = cfg.parallel
        _check(p.pipeline == 1 and p.context == 1,
               "train.eval_tasks runs the model's plain forward pass: not with parallel.pipeline or parallel.context > 1 "
               "(run tools/evaluate.py --tasks on a checkpoint instead)")
    c = cfg.checkpoint
    _check(c.interval >= 0 and c.keep_last >= 0, "checkpoint.interval and keep_last must not be negative")
    _check(cfg.logging.peak_tflops >= 0, "logging.peak_tflops must not be negative")
    _check(cfg.logging.straggler_interval >= 0 and cfg.logging.straggler_ratio >= 1,
           "logging.straggler_interval must not be negative and logging.straggler_ratio must be at least 1")
