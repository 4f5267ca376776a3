"""Plan a run before launching it: per-rank memory (per ZeRO stage), FLOPs per step, step time.

Notation: Psi = parameter elements one rank holds (its pipeline stage, its tensor shard, the
padded vocabulary: what is really allocated), N = data-parallel size, w = bytes of a weight in
the training precision (2 for bf16/fp16, 4 for fp32), t = tensor-parallel size, s = sequence
length, b = micro batch, d = hidden size, f = MLP width, a = query width (num_heads x head_dim),
k = kv width (num_kv_heads x head_dim).

Model states follow ZeRO (Rajbhandari et al. 2020) as DeepSpeed implements it, in bytes per rank:

    stage   parameters   gradients   optimizer (fp32 master 4 + Adam m 4 + v 4 = 12 bytes)
    0       w Psi        w Psi       12 Psi
    1       w Psi        w Psi       12 Psi / N
    2       w Psi        w Psi / N   12 Psi / N
    3       w Psi / N    w Psi / N   12 Psi / N

except fp32 with ZeRO-0, where the weights are the master copy (optimizer 8 Psi). DeepSpeed's
ZeRO 1-3 keep a separate fp32 master partition even in fp32 training, hence 12. Under
optimizer.name=muon the hidden matrices (megalm.training.muon.muon_matrices, counted on the model
built on the meta device) keep one state, the momentum (4 bytes, not Adam's 8), the rest Adam's.
Not counted: the transient fp32 gradient partition inside optimizer.step(), ZeRO-2/3 communication
buckets (zero.reduce_bucket_size elements), ZeRO-3's gathered layers, and Muon's per-step gathers
(a matrix's tensor shards; under ZeRO 1/2 its group's fp32 update, one group at a time).

Under context parallelism (C = parallel.context) a rank holds s / C tokens of every sequence:
every activation below is per token of that chunk (Ulysses' all-to-all trades the sequence split
for a head split, the same bytes), and ZeRO partitions over N x C ranks (DeepSpeed's sequence
data parallel group). Document masking or a sliding window adds its mask once per micro batch,
shared by the blocks:
on GPU FlexAttention's BlockMask, (s/128)^2 int32 tile indices twice (partial and full tiles)
plus the document ids (`document_mask_bytes`); on CPU (SDPA) a boolean s x s mask per sample.

Expert parallelism (E = parallel.expert) splits each MoE block's routed experts over E ranks of
data x context: a rank holds 1/(t E) of them, and ZeRO partitions their states over the
(N x C) / E ranks holding the same experts, so they appear in the table with their own divisor.
Each MoE block sends every token's k copies to their experts' ranks and takes them back, in the
forward and again in the backward (`all_to_all_bytes`).

Activations are counted for megalm's layers as written (SDPA, i.e. flash attention on GPU, so
Megatron's 5 a s^2 b softmax term of "Reducing Activation Recomputation in Large Transformer
Models", Korthikanti et al. 2022, does not exist): see `activation_bytes_per_token`. For GPT-2
shapes in bf16 without dropout this is exactly Megatron's 34 s b d per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megalm.config import Config, ModelConfig
from megalm.errors import MegalmError
from megalm.model.flops import (
    block_parameters,
    count_parameters,
    flops_per_token_megatron,
    flops_per_token_palm,
)
from megalm.model.moe import is_moe_layer
from megalm.parallel.vocab import padded_vocab_size
from megalm.training.ds_config import deepspeed_zero_stage

GIB = 2**30
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 8  # exp_avg and exp_avg_sq in fp32
MUON_BYTES = 4  # Muon's momentum in fp32
MASTER_BYTES = 4  # fp32 master copy


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer states on one rank for one ZeRO stage."""

    stage: int
    params: int
    grads: int
    optimizer: int
    allowed: bool  # DeepSpeed's pipeline engine takes ZeRO 0 and 1 only; expert parallelism ZeRO 0-2

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(numel: int, precision: str, stage: int, data: int, allowed: bool = True,
                      state_bytes: int = ADAM_BYTES) -> ModelStates:
    """ZeRO's per-rank bytes (table in the module docstring) for `numel` parameters on this rank whose
    optimizer keeps `state_bytes` per element besides the master (Adam's two moments by default)."""
    w = WEIGHT_BYTES[precision]
    master = 0 if (precision == "fp32" and stage == 0) else MASTER_BYTES

    def shard(n: int, sharded: bool) -> int:
        return -(-n // data) if sharded else n

    return ModelStates(
        stage=stage,
        params=shard(w * numel, stage >= 3),
        grads=shard(w * numel, stage >= 2),
        optimizer=shard((master + state_bytes) * numel, stage >= 1),
        allowed=allowed,
    )


def expert_layer_parameters(m: ModelConfig, tensor: int, expert: int = 1) -> list[int]:
    """Routed-expert elements one rank holds of each pipeline layer (layer_parameters' order):
    E experts of 3 d f_e per MoE block, over tensor x expert."""
    per_block = m.moe_num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    return [0, *(per_block // (tensor * expert) if is_moe_layer(m, i) else 0 for i in range(m.num_layers)), 0, 0]


def muon_layer_parameters(m: ModelConfig, tensor: int) -> list[int]:
    """Elements one tensor rank holds of each pipeline layer (layer_parameters' order) in matrices
    that take Muon, routed experts excepted (all of theirs do): q, k, v, output and MLP matrices, all
    tensor-parallel; counted on the model built on the meta device, as training groups it."""
    import torch  # noqa: PLC0415 - the planner stays light unless Muon is planned

    from megalm.model.gpt import GPT  # noqa: PLC0415
    from megalm.model.moe import GroupedExperts  # noqa: PLC0415
    from megalm.parallel.context import TensorParallel  # noqa: PLC0415
    from megalm.training.muon import muon_matrices  # noqa: PLC0415

    with torch.device("meta"):
        model = GPT(m, TensorParallel.build(None))
    matrices = muon_matrices(model, m)
    routed = {id(p) for mod in model.modules() if isinstance(mod, GroupedExperts) for p in mod.parameters()}
    blocks = [0] * m.num_layers
    for name, p in model.named_parameters():
        if id(p) in matrices and id(p) not in routed:
            blocks[int(name.split(".")[1])] += p.numel()  # blocks.<i>....
    return [0, *(b // tensor for b in blocks), 0, 0]


def layer_parameters(m: ModelConfig, tensor: int, pipeline: int, expert: int = 1) -> list[int]:
    """Parameter elements one tensor rank holds of each pipeline layer, in order:
    [embedding, block x L, final norm, head]. Matmul weights and column-parallel biases are split
    over t; norms and row-parallel biases are replicated; the vocabulary is padded to a multiple
    of make_vocab_size_divisible_by x t. A tied head is a copy of the embedding on the last stage
    when pipeline > 1 and nothing otherwise. Routed experts are split over expert as well."""
    d = m.hidden_size
    vocab_rows = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tensor) // tensor
    # 2 RMSNorm (+ qk-norm) | 2 LayerNorm (w, b) + 2 row biases; a MoE block's router and shared gate
    replicated = 2 * d + 2 * m.head_dim * m.qk_norm if m.arch == "llama" else 6 * d

    experts = expert_layer_parameters(m, 1)

    def block(i: int) -> int:
        kept = replicated + (m.moe_num_experts * d + d * m.moe_shared_expert_gate if is_moe_layer(m, i) else 0)
        routed = experts[i + 1]
        return (block_parameters(m, i)[1] - kept - routed) // tensor + routed // (tensor * expert) + kept

    embedding = vocab_rows * d + (m.max_seq_len * d if m.arch == "gpt2" else 0)
    head = vocab_rows * d if (not m.tie_embeddings or pipeline > 1) else 0
    final_norm = d if m.arch == "llama" else 2 * d
    return [embedding, *(block(i) for i in range(m.num_layers)), final_norm, head]


def partition_stages(weights: list[int], parts: int, method: str) -> list[range]:
    """Contiguous ranges of layers per stage. "parameters": the split that minimises the largest
    stage's parameter count (the objective of DeepSpeed's partition_balanced); otherwise uniform
    by layer count (DeepSpeed's "uniform"; "type:" patterns are approximated by it)."""
    n = len(weights)
    if method != "parameters":
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        return [range(bounds[i], bounds[i + 1]) for i in range(parts)]
    lo, hi = max(weights), sum(weights)
    while lo < hi:  # binary search for the smallest feasible bottleneck
        mid = (lo + hi) // 2
        if len(_greedy_split(weights, mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    stages = _greedy_split(weights, lo)
    while len(stages) < parts:  # split the longest stage so every stage has a layer
        i = max(range(len(stages)), key=lambda j: len(stages[j]))
        r = stages[i]
        stages[i:i + 1] = [range(r.start, r.start + 1), range(r.start + 1, r.stop)]
    return stages


def _greedy_split(weights: list[int], cap: int) -> list[range]:
    stages, start, load = [], 0, 0
    for i, w in enumerate(weights):
        if load + w > cap and i > start:
            stages.append(range(start, i))
            start, load = i, 0
        load += w
    stages.append(range(start, len(weights)))
    return stages


def activation_bytes_per_token(m: ModelConfig, precision: str, tensor: int, sequence_parallel: bool) -> float:
    """Bytes one transformer block keeps for backward, per token of the micro batch.

    With e = activation bytes (2 bf16/fp16, 4 fp32), sharded over t:
      llama: e (qkv out a+2k, RoPE q a and k k, SDPA out a, proj input a) + e (fc1 out 2f, silu f, product f)
             = e (4a + 3k + 4f); qk-norm adds its fp32 input copies and outputs, (4 + e)(a + k)
      gpt2:  e (qkv out a+2k, SDPA out a, proj input a, gelu in f, gelu out f) = e (3a + 2k + 2f)
    replicated over t (norm inputs sharded by sequence parallelism, matmul inputs gathered):
      llama: 2 x 4d (RMSNorm keeps an fp32 copy of its input) + e (qkv input d + MLP input d)
      gpt2:  2 x e d (LayerNorm inputs) + e (qkv input d + MLP input d)
    plus two 1-byte residual dropout masks when model.dropout > 0. SDPA keeps q, k, v and its
    output (and a fp32 logsumexp per head and token, ignored): no s^2 term.
    A MoE block (the largest when the model has any: the figure is a bound for its stages) keeps,
    instead of the MLP's 4f, each of its k experts' 4 f_e and the shared expert's 4 f_s (sharded),
    and, replicated, the k dispatched copies of the token and of its expert output (2 k e d), the
    router's fp32 input (4d), logits and scores (8 E).
    """
    e, d, f = WEIGHT_BYTES[precision], m.hidden_size, m.ffn_hidden_size
    a, k = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    mlp, routing = 4 * f, 0
    if any(is_moe_layer(m, i) for i in range(m.num_layers)):
        mlp = 4 * m.moe_top_k * m.moe_ffn_hidden_size + 4 * m.moe_shared_expert_size
        routing = 2 * m.moe_top_k * e * d + 4 * d + 8 * m.moe_num_experts
    if m.arch == "llama":
        sharded, norms = e * (4 * a + 3 * k + mlp) + (4 + e) * (a + k) * m.qk_norm, 2 * 4 * d
    else:
        sharded, norms = e * (3 * a + 2 * k + 2 * f), 2 * e * d
    seq_sharded = norms + (2 * d if m.dropout > 0 else 0)
    return sharded / tensor + seq_sharded / (tensor if sequence_parallel else 1) + e * 2 * d + routing


def head_bytes(m: ModelConfig, precision: str, tensor: int, sequence_parallel: bool, tokens: int) -> float:
    """The last stage's extra for one micro batch of `tokens`: per token the final norm's input
    (fp32 for RMSNorm) and the head's gathered input (e d); then, unfused, the vocab-sharded logits
    (e) with their fp32 softmax (4) per entry; fused (model.loss_chunk_tokens > 0), the hidden
    gradient (e d) per token, one chunk's logits, fp32 logits and fp32 gradient, and the fp32
    weight gradient (4 V d) kept from forward to backward."""
    e, d = WEIGHT_BYTES[precision], m.hidden_size
    norm = (4 if m.arch == "llama" else e) * d / (tensor if sequence_parallel else 1)
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tensor) // tensor
    if m.loss_chunk_tokens <= 0:
        return (norm + e * d + (e + 4) * vocab) * tokens
    chunk = min(m.loss_chunk_tokens, tokens)
    return (norm + 2 * e * d) * tokens + (e + 8) * vocab * chunk + 4 * vocab * d


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as seen by one of its ranks."""

    index: int
    layers: range
    num_blocks: int
    params: int  # elements on one tensor rank
    expert_params: int  # of which routed experts (ZeRO partitions them over data x context / expert)
    muon_params: int  # of which other matrices taking Muon (optimizer.name=muon; else 0)
    moe_blocks: int
    in_flight: int  # micro batches whose activations 1F1B keeps at once: min(p - i, accumulation)
    activations: int  # bytes, with the configured activation checkpointing
    activations_no_ckpt: int
    activations_ckpt: int


def document_mask_bytes(micro_batch: int, seq_len: int, device: str = "gpu", block: int = 128) -> int:
    """The document mask of one micro batch (model.document_mask): FlexAttention's BlockMask on GPU
    (per sample, partial and full tiles: a count per query tile and a tile index per tile pair, int32;
    the 8-byte document id per token), SDPA's boolean (seq x seq) mask per sample on CPU."""
    if device == "cpu":
        return micro_batch * seq_len * seq_len
    tiles = -(-seq_len // block)
    return micro_batch * (2 * 4 * (tiles + tiles * tiles) + 8 * seq_len)


def stage_activations(cfg: Config, blocks: int, in_flight: int, last: bool, checkpointing: bool) -> int:
    """Activation bytes of a stage: in_flight x blocks x per-block bytes (checkpointing: only the
    block input, e d / (t if sequence parallel), plus one block recomputed at a time), on the last
    stage the head's activations for one micro batch, and in_flight document masks. Tokens are the
    rank's: micro batch x seq_len / context."""
    m, p, prec = cfg.model, cfg.parallel, cfg.train.precision
    t, sp = p.tensor, p.sequence_parallel and p.tensor > 1
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // p.context
    per_block = activation_bytes_per_token(m, prec, t, sp) * tokens
    if checkpointing:
        kept = WEIGHT_BYTES[prec] * m.hidden_size / (t if sp else 1) * tokens
        total = in_flight * blocks * kept + (per_block if blocks else 0)
    else:
        total = in_flight * blocks * per_block
    if last:
        total += head_bytes(m, prec, t, sp, tokens)
    if (m.document_mask or m.sliding_window) and blocks:
        batch = cfg.train.micro_batch_size if m.document_mask else 1  # a window alone: one mask for all
        total += in_flight * document_mask_bytes(batch, cfg.data.seq_len)
    return int(total)


def build_stages(cfg: Config) -> list[Stage]:
    """Every pipeline stage of a validated config: its layers, parameters and activations."""
    m, p = cfg.model, cfg.parallel
    weights = layer_parameters(m, p.tensor, p.pipeline, p.expert)
    experts = expert_layer_parameters(m, p.tensor, p.expert)
    muon = muon_layer_parameters(m, p.tensor) if cfg.optimizer.name == "muon" else [0] * len(weights)
    stages = []
    for i, layers in enumerate(partition_stages(weights, p.pipeline, p.pipeline_partition)):
        blocks = sum(1 for j in layers if 1 <= j <= m.num_layers)
        in_flight = min(p.pipeline - i, cfg.train.grad_accum_steps)
        last = i == p.pipeline - 1
        acts = {ck: stage_activations(cfg, blocks, in_flight, last, ck) for ck in (False, True)}
        moe = sum(1 for j in layers if 1 <= j <= m.num_layers and is_moe_layer(m, j - 1))
        stages.append(Stage(i, layers, blocks, sum(weights[j] for j in layers), sum(experts[j] for j in layers),
                            sum(muon[j] for j in layers), moe,
                            in_flight, acts[m.activation_checkpointing], acts[False], acts[True]))
    return stages


def all_to_all_bytes(cfg: Config, moe_blocks: int) -> int:
    """Bytes one rank sends per step in expert parallelism's all-to-alls: per MoE block and micro
    batch, its tokens' k copies (w d bytes each) go to their experts' ranks and return, forward and
    backward (4 exchanges), the fraction (E - 1) / E leaving the rank when routing is balanced. Every
    tensor rank exchanges the whole micro batch's tokens (its slice of the experts works on all)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if p.expert == 1:
        return 0
    tokens = t.micro_batch_size * cfg.data.seq_len // p.context
    copies = 4 * m.moe_top_k * tokens * m.hidden_size * WEIGHT_BYTES[t.precision]
    return int(moe_blocks * t.grad_accum_steps * copies * (p.expert - 1) / p.expert)


@dataclass(frozen=True)
class Plan:
    """Everything the planner reports for one config on `world_size` devices (bytes, FLOPs, s)."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    context: int
    expert: int
    document_mask: bool
    sequence_parallel: bool
    zero_stage: int
    """The stage DeepSpeed runs (megalm.training.ds_config.deepspeed_zero_stage: ZeRO 1/2 on one data-parallel
    rank run as 0)."""
    configured_zero_stage: int
    offload_optimizer: bool
    precision: str
    optimizer: str  # optimizer.name
    activation_checkpointing: bool
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    seq_len: int
    tokens_per_step: int
    steps: int
    parameters: int  # the model's, vocabulary padding excluded (megalm.model.flops)
    rank_parameters: int  # elements on one rank of the stage below (padding included)
    rank_expert_parameters: int  # of which routed experts
    all_to_all_bytes: int  # per rank and step: the MoE blocks' token exchange (0 without expert parallelism)
    stage: int  # the pipeline stage with the most memory at the configured ZeRO stage
    stage_blocks: int
    zero: list[ModelStates]
    activations: int  # that stage, configured checkpointing
    activations_no_ckpt: int
    activations_ckpt: int
    flops_per_token_palm: int
    flops_per_token_megatron: int  # with recomputation when checkpointing
    flops_per_step_palm: int
    flops_per_step_megatron: int
    peak_tflops: float
    mfu: float
    step_seconds: float  # PaLM FLOPs per step / (devices x peak x MFU)
    total_seconds: float

    def rank_bytes(self, stage: int) -> int:
        """Device bytes per rank at ZeRO `stage`: model states (optimizer on the host when
        offloaded) plus activations."""
        s = self.zero[stage]
        return s.total - (s.optimizer if self.offload_optimizer else 0) + self.activations

    def to_dict(self) -> dict:
        out = asdict(self)
        out["zero"] = [{**asdict(s), "total": s.total, "rank_bytes": self.rank_bytes(s.stage)} for s in self.zero]
        out["rank_bytes"] = self.rank_bytes(self.zero_stage)
        return out


def make_plan(cfg: Config, world_size: int, mfu: float = 0.4, peak_tflops: float = 989.0) -> Plan:
    """Validate `cfg` for `world_size` devices and plan it. `peak_tflops` is per device (dense
    bf16: 989 for H100/H200 SXM); step time = PaLM FLOPs per step / (world x peak x mfu)."""
    if world_size < 1:
        raise MegalmError(f"--gpus must be a positive number of devices, got {world_size}")
    if not 0 < mfu <= 1:
        raise MegalmError(f"--mfu must be in (0, 1], got {mfu}")
    if peak_tflops <= 0:
        raise MegalmError(f"--peak-tflops must be positive, got {peak_tflops}")
    cfg.validate(world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    data = world_size // (p.tensor * p.pipeline * p.context)
    shards = data * p.context  # ZeRO partitions over data x context

    def states(stage: Stage) -> list[ModelStates]:
        """Dense parameters partitioned over data x context, routed experts over its 1/E; under Muon
        its matrices with one state each."""
        experts_state = MUON_BYTES if cfg.optimizer.name == "muon" else ADAM_BYTES
        out = []
        for z in range(4):
            allowed = p.pipeline == 1 or z <= 1
            parts = [model_state_bytes(stage.params - stage.expert_params - stage.muon_params, t.precision, z, shards,
                                       allowed),
                     model_state_bytes(stage.muon_params, t.precision, z, shards, state_bytes=MUON_BYTES),
                     model_state_bytes(stage.expert_params, t.precision, z, shards // p.expert, state_bytes=experts_state)]
            allowed = allowed and not (p.expert > 1 and z == 3)  # refused at start-up (config validation)
            allowed = allowed and not (cfg.optimizer.name == "muon" and z == 3)
            out.append(ModelStates(z, *(sum(getattr(s, k) for s in parts) for k in ("params", "grads", "optimizer")),
                                   allowed))
        return out

    stages = build_stages(cfg)
    running = deepspeed_zero_stage(cfg, shards, p.pipeline)
    worst = max(stages, key=lambda s: states(s)[running].total + s.activations)
    tokens = t.global_batch_size * cfg.data.seq_len
    palm = flops_per_token_palm(m, cfg.data.seq_len)
    megatron = flops_per_token_megatron(m, cfg.data.seq_len, recompute=m.activation_checkpointing)
    step_seconds = palm * tokens / (world_size * peak_tflops * 1e12 * mfu)
    return Plan(
        world_size=world_size, tensor=p.tensor, pipeline=p.pipeline, data=data, context=p.context, expert=p.expert,
        document_mask=m.document_mask,
        sequence_parallel=p.sequence_parallel and p.tensor > 1, zero_stage=running,
        configured_zero_stage=cfg.zero.stage,
        offload_optimizer=cfg.zero.offload_optimizer, precision=t.precision, optimizer=cfg.optimizer.name,
        activation_checkpointing=m.activation_checkpointing, micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps, global_batch_size=t.global_batch_size,
        seq_len=cfg.data.seq_len, tokens_per_step=tokens, steps=t.steps,
        parameters=count_parameters(m), rank_parameters=worst.params, rank_expert_parameters=worst.expert_params,
        all_to_all_bytes=all_to_all_bytes(cfg, worst.moe_blocks), stage=worst.index,
        stage_blocks=worst.num_blocks, zero=states(worst), activations=worst.activations,
        activations_no_ckpt=worst.activations_no_ckpt, activations_ckpt=worst.activations_ckpt,
        flops_per_token_palm=palm, flops_per_token_megatron=megatron,
        flops_per_step_palm=palm * tokens, flops_per_step_megatron=megatron * tokens,
        peak_tflops=peak_tflops, mfu=mfu, step_seconds=step_seconds, total_seconds=step_seconds * t.steps,
    )
