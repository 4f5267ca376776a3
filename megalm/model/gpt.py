"""The decoder-only transformer as stage modules (Embedding, Block, FinalNorm, Head) and GPT.

Each stage module maps one tensor to one tensor, so the same classes chain in GPT and in a
DeepSpeed PipelineModule (LayerSpec(Block, cfg, i, tp_group=..., seed=..., rng=...); with tied
embeddings TiedLayerSpec("embed", Embedding, ..., forward_fn=Embedding.logits,
tied_weight_attr="weight") on the last stage). Constructors take only ModelConfig and keyword
arguments, and each module seeds its own initialisation from (seed, its name), so a stage built
alone has exactly the weights it has in the whole model, at any tensor-parallel size.

Activations between stages are (batch, seq, hidden), or (batch, seq / p, hidden) sequence shards
under sequence parallelism; logits stay split over the vocabulary: (batch, seq, V_pad / p).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.model.layers import MLP, Attention, KVCache, build_norm
from megalm.parallel.cross_entropy import IGNORE_INDEX, linear_cross_entropy, vocab_parallel_cross_entropy
from megalm.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    column_parallel_input,
    column_parallel_matmul,
    mark_replicated,
    padded_vocab_size,
    strip_vocab_padding,
)
from megalm.parallel.mappings import (
    gather_from_tensor_region,
    group_rank,
    group_size,
    scatter_to_sequence_region,
)
from megalm.parallel.random import TensorParallelRNG, init_generator, maybe_fork, normal_init


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy with derived values filled in (num_kv_heads, ffn_hidden_size, tie_embeddings), as
    Config.validate() does; for building a model from a bare ModelConfig (tests, conversion)."""
    from megalm.config_validation import validate_model

    cfg = copy.deepcopy(cfg)
    validate_model(cfg)
    return cfg


def _check_resolved(cfg: ModelConfig) -> None:
    if cfg.num_kv_heads is None or cfg.ffn_hidden_size is None or cfg.tie_embeddings is None:
        raise MegalmError("ModelConfig is not resolved: call Config.validate() or resolve_model_config(cfg)")


def padded_vocab(cfg: ModelConfig, tp_group: dist.ProcessGroup | None) -> int:
    """Rows of the embedding table: V rounded up to make_vocab_size_divisible_by x tensor size."""
    return padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, group_size(tp_group))


def _dropout(x: torch.Tensor, p: float, training: bool, rng: TensorParallelRNG | None) -> torch.Tensor:
    """Dropout; `rng` (the tensor-parallel fork) when x is a per-rank shard, else the default."""
    if p == 0.0 or not training:
        return x
    with maybe_fork(rng):
        return F.dropout(x, p, training=True)


def _sp_rng(sequence_parallel: bool, rng: TensorParallelRNG | None, cfg: ModelConfig, tp: int) -> TensorParallelRNG | None:
    if cfg.dropout > 0 and tp > 1 and rng is None:
        raise MegalmError("dropout with tensor parallelism needs rng=TensorParallelRNG(seed, tensor_rank)")
    return rng if sequence_parallel else None  # sequence shards differ per rank; replicas agree


class Embedding(nn.Module):
    """tokens (batch, seq) -> hidden (batch, seq[/p], d): vocab-parallel token embedding, plus
    learned positions for gpt2, then dropout. `logits(h)` is the tied output head: h E^T."""

    def __init__(
        self, cfg: ModelConfig, *, tp_group: dist.ProcessGroup | None, sequence_parallel: bool = False,
        seed: int, rng: TensorParallelRNG | None = None,
    ) -> None:
        super().__init__()
        _check_resolved(cfg)
        self.cfg, self.tp_group, self.sequence_parallel = cfg, tp_group, sequence_parallel
        self.rng = _sp_rng(sequence_parallel, rng, cfg, group_size(tp_group))
        init = normal_init(cfg.init_std, init_generator(seed, "embedding"), rows=cfg.vocab_size)
        self.word = VocabParallelEmbedding(padded_vocab(cfg, tp_group), cfg.hidden_size, group=tp_group, init_method=init)
        self.position = None
        if cfg.arch == "gpt2":
            self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            normal_init(cfg.init_std, init_generator(seed, "position_embedding"))(self.position.weight)
            mark_replicated(self.position, sequence_parallel=False)  # its gradient is complete

    @property
    def weight(self) -> nn.Parameter:
        """The (vocab-sharded) token embedding, the tied weight of a TiedLayerSpec."""
        return self.word.weight

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        h = self.word(tokens)  # (batch, seq, hidden), all-reduced over the tensor ranks
        if self.position is not None:
            if start_pos + tokens.size(1) > self.cfg.max_seq_len:
                raise MegalmError(f"sequence of {start_pos + tokens.size(1)} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
            h = h + self.position(torch.arange(start_pos, start_pos + tokens.size(1), device=tokens.device))
        if self.sequence_parallel:
            h = scatter_to_sequence_region(h, self.tp_group)  # (batch, seq / p, hidden)
        return _dropout(h, self.cfg.dropout, self.training, self.rng)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head: (batch, seq[/p], d) -> vocab-sharded logits (batch, seq, V_pad / p)."""
        return column_parallel_matmul(h, self.word.weight, None, self.tp_group, self.sequence_parallel)


class Block(nn.Module):
    """Pre-norm transformer block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).

    `layer_number` (0-based) names the init generator (seed, "block.{layer_number}"). With
    cfg.activation_checkpointing the block is recomputed in backward (non-reentrant checkpoint;
    the tensor-parallel dropout state is replayed so recomputed masks equal the first ones).
    """

    def __init__(
        self, cfg: ModelConfig, layer_number: int, *, tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool = False, seed: int, rng: TensorParallelRNG | None = None,
    ) -> None:
        super().__init__()
        _check_resolved(cfg)
        self.cfg, self.layer_number = cfg, layer_number
        self.rng = rng
        self.residual_rng = _sp_rng(sequence_parallel, rng, cfg, group_size(tp_group))
        generator = init_generator(seed, f"block.{layer_number}")
        self.norm1 = build_norm(cfg, sequence_parallel, tp_group)
        self.attn = Attention(cfg, group=tp_group, sequence_parallel=sequence_parallel, generator=generator, rng=rng)
        self.norm2 = build_norm(cfg, sequence_parallel, tp_group)
        self.mlp = MLP(cfg, group=tp_group, sequence_parallel=sequence_parallel, generator=generator)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return self._checkpointed(x)
        return self._forward(x, start_pos, cache)

    def _forward(self, x: torch.Tensor, start_pos: int, cache: KVCache | None) -> torch.Tensor:
        p, train = self.cfg.dropout, self.training
        h = x + _dropout(self.attn(self.norm1(x), start_pos, cache), p, train, self.residual_rng)
        return h + _dropout(self.mlp(self.norm2(h)), p, train, self.residual_rng)

    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        # torch's checkpoint replays the default generators; the tracker's state is replayed here,
        # and restored after the recomputation so later forwards continue where they left off.
        before = self.rng.get_states() if self.rng is not None else None
        calls = [0]

        def run(x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1 or before is None:
                return self._forward(x, 0, None)
            after = self.rng.get_states()
            self.rng.set_states(before)
            try:
                return self._forward(x, 0, None)
            finally:
                self.rng.set_states(after)

        return checkpoint(run, x, use_reentrant=False)


class FinalNorm(nn.Module):
    """The norm after the last block: hidden -> hidden (per sequence shard under sequence parallel)."""

    def __init__(
        self, cfg: ModelConfig, *, tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.norm = build_norm(cfg, sequence_parallel, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Head(nn.Module):
    """Untied output layer: hidden (batch, seq[/p], d) -> logits (batch, seq, V_pad / p),
    column-parallel over the padded vocabulary (padding rows are zero); never gathered."""

    def __init__(
        self, cfg: ModelConfig, *, tp_group: dist.ProcessGroup | None, sequence_parallel: bool = False, seed: int,
        pass_hidden: bool = False,
    ) -> None:
        super().__init__()
        init = normal_init(cfg.init_std, init_generator(seed, "head"), rows=cfg.vocab_size)
        self.linear = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab(cfg, tp_group), group=tp_group, init_method=init,
            sequence_parallel=sequence_parallel,
        )
        self.pass_hidden = pass_hidden  # a pipeline's last layer whose loss_fn is a HeadLoss

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.pass_hidden else self.linear(h)


def head_loss(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cfg: ModelConfig,
    tp_group: dist.ProcessGroup | None, sequence_parallel: bool,
) -> torch.Tensor:
    """Mean loss of the output layer `weight` (V_pad / p, d) on the final hidden states, fused with
    the cross entropy cfg.loss_chunk_tokens tokens at a time (the logits never exist whole)."""
    x = column_parallel_input(h, tp_group, sequence_parallel)
    return linear_cross_entropy(x, weight, labels, tp_group, cfg.vocab_size, IGNORE_INDEX, cfg.loss_chunk_tokens)


class HeadLoss:
    """loss_fn(h, labels) of a pipeline whose last layer passes the final hidden states through:
    `owner` (the last stage's Head or tied embedding copy) holds the output weight."""

    def __init__(self, cfg: ModelConfig, owner: nn.Module, tp_group: dist.ProcessGroup | None,
                 sequence_parallel: bool) -> None:
        self.cfg, self.owner, self.tp_group, self.sequence_parallel = cfg, owner, tp_group, sequence_parallel

    def __call__(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return head_loss(h, self.owner.weight, labels, self.cfg, self.tp_group, self.sequence_parallel)


class GPTLoss:
    """loss_fn(logits_shard, labels) -> mean token loss, for GPT and DeepSpeed's PipelineModule."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup | None) -> None:
        self.vocab_size, self.tp_group = cfg.vocab_size, tp_group

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.tp_group, self.vocab_size, IGNORE_INDEX)


class GPT(nn.Module):
    """Embedding -> num_layers x Block -> FinalNorm -> Head (or the tied embedding).

    forward(tokens (batch, seq) int64, labels=None) -> mean loss when labels are given (the output
    layer fused with the cross entropy unless cfg.loss_chunk_tokens is 0), else vocab-sharded
    logits (batch, seq, V_pad / p). `logits_full` gathers the vocabulary and strips
    the padding for generation. `tp_group=None`: no tensor parallelism. The dropout tracker
    `self.rng` is seeded from (seed, tensor rank); the default generator is the trainer's to seed.
    """

    def __init__(
        self, cfg: ModelConfig, tp_group: dist.ProcessGroup | None, sequence_parallel: bool = False,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        _check_resolved(cfg)
        self.cfg, self.tp_group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.vocab_size, self.padded_vocab_size = cfg.vocab_size, padded_vocab(cfg, tp_group)
        self.rng = TensorParallelRNG(seed, group_rank(tp_group))
        kw = dict(tp_group=tp_group, sequence_parallel=self.sequence_parallel, seed=seed)
        self.embedding = Embedding(cfg, rng=self.rng, **kw)
        self.blocks = nn.ModuleList(Block(cfg, i, rng=self.rng, **kw) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg, tp_group=tp_group, sequence_parallel=self.sequence_parallel)
        self.head = None if cfg.tie_embeddings else Head(cfg, **kw)
        self.loss_fn = GPTLoss(cfg, tp_group)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
        start_pos: int = 0, cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        if cache is not None and self.sequence_parallel:
            raise MegalmError("the KV cache (generation) does not work with sequence parallelism")
        h = self.embedding(tokens, start_pos)
        for i, block in enumerate(self.blocks):
            h = block(h, start_pos, None if cache is None else cache[i])
        h = self.final_norm(h)
        if labels is not None and self.cfg.loss_chunk_tokens > 0:
            weight = self.embedding.weight if self.head is None else self.head.weight
            return head_loss(h, weight, labels, self.cfg, self.tp_group, self.sequence_parallel)
        logits = self.embedding.logits(h) if self.head is None else self.head(h)
        return logits if labels is None else self.loss_fn(logits, labels)

    @torch.no_grad()
    def logits_full(
        self, tokens: torch.Tensor, *, start_pos: int = 0, cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Logits over the real vocabulary (batch, seq, V), gathered from the tensor ranks."""
        logits = gather_from_tensor_region(self(tokens, start_pos=start_pos, cache=cache), self.tp_group)
        return strip_vocab_padding(logits, self.vocab_size, dim=-1)

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """An empty KV cache per block for `batch` sequences of up to max_len tokens."""
        attn = self.blocks[0].attn
        param = next(self.parameters())
        return [
            KVCache(batch, max_len or self.cfg.max_seq_len, attn.kv_heads, attn.head_dim,
                    dtype or param.dtype, device or param.device)
            for _ in self.blocks
        ]
