"""The run configuration's schema: one kw_only dataclass per section, each field documented.

A run is one YAML file with these sections (loading: megalm.config.loading; checks and derived
values: megalm.config.validation). Each field's docstring is the string literal that follows it;
megalm.config.reference collects them for docs/config.md and `--help-config`.

A ModelConfig is complete once constructed: its derived defaults (kv heads, MLP width, tying)
depend only on model keys and are filled in `__post_init__`, so no model code ever sees a None.
Derived values that depend on other sections or on the world size (data parallel size, gradient
accumulation, sequence length, steps from tokens) are filled by `Config.validate(world_size)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from megalm.config.validation import validate_config
from megalm.config.values import llama_ffn_width
from megalm.errors import MegalmError


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    """Block structure: llama (RMSNorm, RoPE, SwiGLU, no biases) or gpt2 (LayerNorm, learned
    positions, tanh-GELU, biases)."""
    family: Literal["", "llama", "gpt2", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "none"] = ""
    """The Hugging Face family: the transformers class and model_type to-hf writes, and the features
    that class has (qwen2: qkv_bias; qwen3: qk_norm; mistral, qwen2/3: sliding_window; llama, qwen3,
    mistral: a free head_dim; mixtral, qwen2_moe, qwen3_moe: experts); checked at start-up. from-hf
    sets it. none: no transformers class (a model no family holds, e.g. sigmoid-scored experts:
    it trains, converts between layouts, generates; to-hf refuses it). Default: arch.
    megalm/convert/families.py."""
    hidden_size: int = 256
    """Model width d."""
    num_layers: int = 4
    """Number of transformer blocks L."""
    num_heads: int = 4
    """Attention (query) heads; hidden_size must divide by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (1 = multi-query). Default: num_heads."""
    head_dim: int | None = None
    """Width of each attention head, free of hidden_size / num_heads (Qwen3: 128 with hidden 4096 and
    32 heads; the attention output projection maps num_heads * head_dim back to hidden_size).
    Default: hidden_size / num_heads."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections, not the output one (Qwen2/2.5), split with their
    columns under tensor parallelism (gpt2 has every bias regardless)."""
    qk_norm: bool = False
    """RMSNorm (eps norm_eps, one weight of head_dim shared by the heads) over each head's q and k,
    before RoPE (Qwen3). Its weights are replicated on the tensor ranks (their gradient summed)."""
    sliding_window: int = 0
    """Each token attends to itself and the sliding_window - 1 tokens before it (Mistral v0.1: 4096),
    combined with document_mask when both are set: FlexAttention with a block mask on GPU, SDPA
    with a boolean mask on CPU. 0: the whole causal context."""
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
    rope_scaling: Literal["none", "llama3", "yarn"] = "none"
    """RoPE frequency scaling for a longer context (llama only; transformers' rope_type): llama3
    (Llama 3.1+: low frequencies divided by rope_factor, a smooth band between) or yarn (Qwen2.5,
    DeepSeek: interpolation ramped over the dimensions, cos and sin scaled). megalm/model/rope.py."""
    rope_factor: float = 1.0
    """llama3/yarn: the context extension factor (Llama 3.1: 8)."""
    rope_original_max_seq_len: int = 0
    """llama3/yarn: the context the model was pretrained at before scaling (Llama 3.1: 8192)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above rope_original_max_seq_len / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below rope_original_max_seq_len / this are kept."""
    rope_beta_fast: float = 32.0
    """yarn: rotations in the original context above which a dimension is extrapolated (kept)."""
    rope_beta_slow: float = 1.0
    """yarn: rotations below which a dimension is interpolated (divided by rope_factor)."""
    rope_attention_factor: float = 0.0
    """yarn: the factor on cos and sin (attention temperature); 0: 0.1 ln(rope_factor) + 1."""
    rope_truncate: bool = True
    """yarn: round the ramp's bounds to whole dimensions (transformers' default)."""
    moe_num_experts: int = 0
    """Mixture of experts: routed experts per MoE layer (Mixtral 8, Qwen3-30B-A3B 128). 0: dense
    (every block has the MLP). megalm/model/moe.py."""
    moe_top_k: int = 2
    """Experts each token is sent to."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each expert (transformers' moe_intermediate_size). Default: ffn_hidden_size."""
    moe_layer_freq: int = 1
    """Every n-th block is MoE: block i (0-based) when (i + 1) divides by n (Qwen's decoder_sparse_step)."""
    moe_dense_layers: list[int] = field(default_factory=list)
    """Blocks (0-based) that keep the dense MLP (Qwen's mlp_only_layers; [0, 1, 2]: DeepSeek's first 3 dense)."""
    moe_score: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores from the fp32 logits: softmax over the experts (Mixtral, Qwen) or sigmoid (DeepSeek-V3)."""
    moe_norm_topk_prob: bool = True
    """Renormalise the k chosen scores to sum to 1 (Mixtral always; Qwen3-MoE's norm_topk_prob)."""
    moe_router_scale: float = 1.0
    """Factor on the combine weights (DeepSeek's routed_scaling_factor)."""
    moe_shared_expert_size: int = 0
    """Inner width of a shared expert every token goes through besides its k routed ones (Qwen2-MoE,
    DeepSeek); 0: none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x w) (Qwen2-MoE's shared_expert_gate)."""
    moe_capacity_factor: float = 0.0
    """0: dropless (no token dropped, no padding). > 0: in training each expert takes at most
    ceil(factor x routed pairs / experts) of the (token, choice) pairs its dispatch sees, keeping the
    highest combine weights; the rest are dropped (the token keeps its residual and other experts)
    and counted (metric moe/N/dropped). The dispatch sees the micro batch's tokens, or under context
    parallelism the rank's chunk: dropping then depends on the layout. Evaluation is dropless."""
    moe_bias_update_rate: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores only to
    choose the experts (the combine weights stay unbiased), moved by this rate x sign(mean - count)
    after every optimizer step from the step's token counts over all data-parallel ranks (DeepSeek-V3:
    0.001). Checkpointed with the model. 0: no bias."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of each MoE layer's switch/GShard load-balancing loss E / k * sum_e f_e p_e (1 when
    balanced), over each micro batch's tokens, summed over the layers and added to the loss's gradient
    (the logged loss is the language-model loss). Mixtral trains with 0.02, Qwen3-MoE 0.001."""
    moe_aux_loss_statistics: Literal["micro_batch", "global_batch"] = "micro_batch"
    """Where the switch loss's f_e (the fraction of tokens routed to expert e) comes from. micro_batch:
    the micro batch's own tokens (the loss is the same at every layout). global_batch: the tokens of
    the step's micro batches so far on every data-parallel rank (Megatron-core's global_aux_loss; Qwen's
    global-batch balancing, arXiv 2501.11873): a looser constraint that lets experts specialise by
    sequence; by definition it depends on how the global batch is split into data-parallel ranks and
    micro batches, and is the same under any tensor, pipeline, context or expert parallelism, ZeRO stage
    and recomputation at one such split."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss, mean over tokens of logsumexp(router logits)^2 (ST-MoE: 1e-3)."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output head. Default: true for gpt2, false for llama."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections use
    init_std / sqrt(2 * num_layers) (GPT-2's scaled residual init)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (pretraining usually uses 0)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    document_mask: bool = False
    """Attention stays inside each document of a packed sample: a token attends to the tokens
    before it in its own document only (documents end at the tokenizer's EOD token, which the
    preprocessor appends). FlexAttention with a block mask on GPU; on CPU, where FlexAttention
    has no backward, SDPA with a boolean mask. false: causal over the whole sample."""
    document_positions: bool = False
    """With document_mask: positions (RoPE, gpt2's position table) restart at 0 at each document
    (Megatron's --reset-position-ids). false: the position in the sample."""
    loss_chunk_tokens: int = 1024
    """Fused output layer + cross entropy, this many tokens at a time: the logits of a whole micro
    batch (and their fp32 softmax) never exist. 0: compute all the logits, then the loss."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads == 0:
            self.head_dim = self.hidden_size // self.num_heads  # else validation names the keys
        if not self.family:
            self.family = self.arch
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size if self.arch == "gpt2" else llama_ffn_width(self.hidden_size)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt2"
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size


@dataclass(kw_only=True)
class DataConfig:
    tokenizer_type: Literal["byte", "sentencepiece", "hf"] = "byte"
    """byte needs no file; sentencepiece reads a .model; hf reads a tokenizer.json (byte-level BPE)."""
    tokenizer_model: str = ""
    """Path of the tokenizer file (empty for byte)."""
    train_prefixes: list[Any] = field(default_factory=list)
    """Shard prefixes (PREFIX.bin/.idx), or [weight, prefix] pairs for a weighted blend: the training
    mixture from step 0. Resumed with other weights, an added or a removed prefix, the mixture changes at
    the resume step and every source continues from its own position (README "Changing the data
    mid-run"); the validation split blends these prefixes with these weights."""
    mixture_schedule: list[Any] = field(default_factory=list)
    """Changes of the training mixture at given steps: [[step, [[weight, prefix], ...]], ...], steps
    increasing; from that step on those prefixes with those weights (an absent prefix is no longer
    drawn, a new one starts at its first sample). E.g. the last 10% of 1000 steps on a high-quality
    source: [[900, [[0.2, web], [0.8, books]]]]. Checkpointed and resumable; metrics log the weights."""
    accept_changed_data: bool = False
    """Resume although a source's contents (its .idx, .bin size or sampled .bin), data.seq_len,
    data.split or the tokenizer differ from what the checkpoint trained on (otherwise one line and exit)."""
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
    """Pipeline-parallel stages (DeepSpeed PipelineModule). Data parallel = world / (tensor x
    context x pipeline)."""
    context: int = 1
    """Context-parallel size C: every sequence is split into C contiguous chunks, one per rank,
    from the data loader on; attention all-to-alls the chunks into whole sequences of 1/C of the
    heads (DeepSpeed Ulysses). num_heads and num_kv_heads must divide by tensor x context."""
    expert: int = 1
    """Expert-parallel size E for mixtures of experts: each MoE layer's experts split over E ranks
    carved from data x context (E divides both model.moe_num_experts and data x context); tokens
    move to their experts' ranks by all-to-all; expert gradients are reduced, and ZeRO partitions
    expert states, over the (data x context) / E ranks holding the same experts. ZeRO 0-2."""
    sequence_parallel: bool = False
    """Shard norms and dropout along the sequence across the tensor axis (needs tensor > 1 to matter)."""
    pipeline_partition: str = "parameters"
    """How DeepSpeed splits layers across stages: parameters, uniform, or type:REGEX."""
    init_timeout_minutes: float = 10.0
    """How long a rank waits for rank 0's rendezvous to become reachable."""
    collective_timeout_minutes: float = 10.0
    """Timeout of every collective, in every process group (megalm's and DeepSpeed's), and of the
    rendezvous once reached: a rank that stops makes the others exit with one line naming the
    step and what it was doing, each live rank's Python stack dumped to RUN_DIR/stacks/."""


@dataclass(kw_only=True)
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded over data parallel.
    In fp32, 1 and 2 run as 0 on a single data-parallel rank (nothing to shard; their buffers only copy)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states and the update on the CPU (stages 1-3)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward pass (useful on GPU)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """adamw; or muon: Muon (momentum orthogonalised by Newton-Schulz) for the hidden matrices (attention
    q, k, v and output, the MLP, each expert), AdamW with the keys below for embeddings, the output head,
    norms and biases. The AdamW learning rate and weight decay carry over (optimizer.muon_update_rms).
    A tensor-parallel matrix is orthogonalised whole (its shards gathered), a fused one per logical
    matrix (q, k, v; gate, up): every layout takes the same step, ZeRO 0-2 (ZeRO-3: refused). megalm/training/muon.py."""
    muon_momentum: float = 0.95
    """Muon: momentum of the gradient, m = momentum m + g."""
    muon_nesterov: bool = True
    """Muon: orthogonalise g + momentum m (Nesterov) rather than m."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations (at least 1)."""
    muon_ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    """Muon: the quintic's (a, b, c), X <- a X + (b A + c A^2) X with A = X X^T (the reference implementation's)."""
    muon_update_rms: float = 0.2
    """Muon: the update is scaled by this x sqrt(max(rows, cols)) (Moonlight), AdamW's typical update RMS, so
    that AdamW's learning rate and weight decay carry over."""
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
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the training model every eval_tasks_interval steps
    (pip install 'megalm[eval]'); results go to the metrics as lm_eval/TASK/METRIC. The names and
    each task's data are checked at start-up: an unknown task or data out of reach is one line then."""
    eval_tasks_interval: int = 0
    """Steps between lm-eval runs (0: never)."""
    eval_tasks_include_path: str = ""
    """A directory of lm-eval task YAMLs (local tasks)."""
    eval_tasks_limit: int = 0
    """At most this many examples per task (0: all)."""
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
    checkpoint directory (global_stepN or its parent). A universal checkpoint (convert_checkpoint.py
    universal) resumes at any tensor / pipeline / data-parallel size and ZeRO stage."""
    save_at_end: bool = True
    """Save after the last step."""
    async_save: bool = False
    """Write checkpoints in the background: training is blocked only while each rank copies its
    state to host memory; a writer thread per rank writes the files while training continues, and
    `latest` names the checkpoint once every rank has finished (checked at each step). Costs host
    memory for one copy of the rank's checkpoint, reserved after the first step and kept for the
    run (page-locked on GPUs); the next save waits for the previous one."""
    fallback: bool = True
    """With load=auto: when the checkpoint `latest` names is damaged (a file missing, truncated or
    corrupt against its manifest), resume from the newest intact one, saying so in one line. An
    unattended requeue then loses at most checkpoint.interval steps instead of stopping; the older
    checkpoint resumes exactly (its data position is its own). false: stop with one line naming
    the damaged file and the intact checkpoint. An explicit checkpoint.load path never falls back."""
    reset_optimizer: bool = False
    """On resume, load weights, step, schedule and data position but start a fresh optimizer
    state (Adam moments zero). The fallback for resuming a ZeRO-1/2 checkpoint at another
    data-parallel size; a universal checkpoint keeps the optimizer instead."""


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write scalars to RUN_DIR/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'megalm[wandb]'): the same scalars as TensorBoard
    and the resolved config. A resumed run continues the same W&B run (its id is kept in
    RUN_DIR/wandb_id). Credentials: WANDB_API_KEY or `wandb login`, as usual."""
    wandb_project: str = "megalm"
    """W&B project."""
    wandb_name: str = ""
    """W&B run name. Default: the run directory's name."""
    wandb_mode: Literal["online", "offline"] = "online"
    """online: stream to the W&B server; offline: write RUN_DIR/wandb/ only (`wandb sync` it later)."""
    console: bool = True
    """Print a line per logged step on rank 0."""
    peak_tflops: float = 0.0
    """Per-device peak bf16 TFLOP/s for MFU. 0: from the device table (A100, H100, H200); on CPU
    MFU is reported only when this is set."""
    straggler_interval: int = 50
    """Every N steps gather each rank's time for its data and forward passes; log the slowest
    rank, its node and its ratio to the median (metrics.jsonl, TensorBoard). 0: off."""
    straggler_ratio: float = 1.5
    """Print a warning line when the slowest rank takes this many times the median."""
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
