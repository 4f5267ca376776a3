"""The decoder-only transformer as stage modules (Embedding, Block, FinalNorm, Head) and GPT.

Each stage module maps one tensor to one tensor, so the same classes chain in GPT and in a
DeepSpeed PipelineModule (megalm.parallel.pipeline; PIPELINE_LAYERS is their order). Constructors
take the ModelConfig and the TensorParallel context (megalm.parallel.context: tensor group,
sequence parallelism, seed, dropout tracker), and each module seeds its own initialisation from
(seed, its name), so a stage built alone has exactly the weights it has in the whole model, at any
tensor-parallel size.

This file is architecture. The loss under tensor parallelism (megalm.parallel.loss) and
activation checkpointing with the dropout stream replayed (megalm.parallel.checkpointing) are
applied from megalm.parallel; a Block only exposes its `recompute` slot.

Activations between stages are (batch, seq, hidden), or (batch, seq / p, hidden) sequence shards
under sequence parallelism; logits stay split over the vocabulary: (batch, seq, V_pad / p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.model.documents import Packing
from megalm.model.layers import MLP, Attention, KVCache, build_norm
from megalm.model.moe import MoE, is_moe_layer
from megalm.model.rope import rope_cos_sin
from megalm.parallel.checkpointing import RecomputeInBackward, apply_activation_checkpointing
from megalm.parallel.context import TensorParallel
from megalm.parallel.context_parallel import chunk_positions
from megalm.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    column_parallel_matmul,
    mark_replicated,
)
from megalm.parallel.loss import GPTLoss, head_loss
from megalm.parallel.mappings import gather_from_tensor_region, scatter_to_sequence_region
from megalm.parallel.random import TensorParallelRNG, init_generator, maybe_fork, normal_init
from megalm.parallel.vocab import padded_vocab_size, strip_vocab_padding

PIPELINE_LAYERS = ("embedding", "blocks", "final_norm", "head")
"""The model's modules in forward order, as GPT's attributes and as a pipeline's layers: layer 0 is
the embedding, 1..L the blocks, L + 1 the final norm, L + 2 the head (or the tied embedding)."""

VOCAB_PARAMETERS = ("embedding.word.weight", "head.linear.weight")
"""Parameters whose rows are the (padded) vocabulary."""


def padded_vocab(cfg: ModelConfig, tensor_size: int) -> int:
    """Rows of the embedding table: V rounded up to make_vocab_size_divisible_by x tensor size."""
    return padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tensor_size)


def _dropout(x: torch.Tensor, p: float, training: bool, rng: TensorParallelRNG | None) -> torch.Tensor:
    """Dropout; `rng` (the tensor-parallel fork) when x is a per-rank shard, else the default."""
    if p == 0.0 or not training:
        return x
    with maybe_fork(rng):
        return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """tokens (batch, seq) -> hidden (batch, seq[/p], d): vocab-parallel token embedding, plus
    learned positions for gpt2, then dropout. `logits(h)` is the tied output head: h E^T."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        init = normal_init(cfg.init_std, init_generator(tp.seed, "embedding"), rows=cfg.vocab_size)
        self.word = VocabParallelEmbedding(padded_vocab(cfg, tp.size), cfg.hidden_size, group=tp.group, init_method=init)
        self.position = None
        if cfg.arch == "gpt2":
            self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            normal_init(cfg.init_std, init_generator(tp.seed, "position_embedding"))(self.position.weight)
            mark_replicated(self.position, sequence_parallel=False)  # its gradient is complete

    @property
    def weight(self) -> nn.Parameter:
        """The (vocab-sharded) token embedding, the tied weight of a TiedLayerSpec."""
        return self.word.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, start_pos: int = 0) -> torch.Tensor:
        """`positions` ([batch,] seq) index gpt2's position table; None: the chunk's place in the
        sequence after start_pos."""
        h = self.word(tokens)  # (batch, seq, hidden), all-reduced over the tensor ranks
        if self.position is not None:
            if positions is None:
                end = start_pos + (self.tp.context_rank + 1) * tokens.size(1)
                if end > self.cfg.max_seq_len:
                    raise MegalmError(f"sequence of {end} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
                positions = chunk_positions(tokens.size(1), self.tp.context, tokens.device, start_pos)
            h = h + self.position(positions)
        if self.tp.sequence_parallel:
            h = scatter_to_sequence_region(h, self.tp.group)  # (batch, seq / p, hidden)
        return _dropout(h, self.cfg.dropout, self.training, self.tp.sequence_rng)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head: (batch, seq[/p], d) -> vocab-sharded logits (batch, seq, V_pad / p)."""
        return column_parallel_matmul(h, self.word.weight, None, self.tp.group, self.tp.sequence_parallel)


class Block(nn.Module):
    """Pre-norm transformer block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)); `mlp` is a
    mixture of experts (megalm.model.moe) in the blocks model.moe_* makes MoE.

    `layer_number` (0-based) names the init generator (seed, "block.{layer_number}"). `recompute`
    is None, or set by megalm.parallel.checkpointing to recompute the block in the backward pass.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg, self.layer_number, self.tp = cfg, layer_number, tp
        self.recompute: RecomputeInBackward | None = None
        generator = init_generator(tp.seed, f"block.{layer_number}")
        self.norm1 = build_norm(cfg, tp)
        self.attn = Attention(cfg, tp, generator)
        self.norm2 = build_norm(cfg, tp)
        self.mlp = MoE(cfg, tp, generator) if is_moe_layer(cfg, layer_number) else MLP(cfg, tp, generator)
        self.mlp.layer_number = layer_number

    def forward(self, x: torch.Tensor, packing: Packing | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.recompute is not None and self.training and torch.is_grad_enabled() and cache is None:
            return self.recompute(self._forward, x, packing)
        return self._forward(x, packing, cache)

    def _forward(self, x: torch.Tensor, packing: Packing | None = None, cache: KVCache | None = None) -> torch.Tensor:
        p, train, rng = self.cfg.dropout, self.training, self.tp.sequence_rng
        h = x + _dropout(self.attn(self.norm1(x), packing, cache), p, train, rng)
        return h + _dropout(self.mlp(self.norm2(h)), p, train, rng)


class FinalNorm(nn.Module):
    """The norm after the last block: hidden -> hidden (per sequence shard under sequence parallel)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.norm = build_norm(cfg, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Head(nn.Module):
    """Untied output layer: hidden (batch, seq[/p], d) -> logits (batch, seq, V_pad / p),
    column-parallel over the padded vocabulary (padding rows are zero); never gathered.
    `pass_hidden`: a pipeline's last layer whose loss_fn (HeadLoss) applies the weight."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, *, pass_hidden: bool = False) -> None:
        super().__init__()
        init = normal_init(cfg.init_std, init_generator(tp.seed, "head"), rows=cfg.vocab_size)
        self.linear = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab(cfg, tp.size), group=tp.group, init_method=init,
            sequence_parallel=tp.sequence_parallel,
        )
        self.pass_hidden = pass_hidden

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.pass_hidden else self.linear(h)


class GPT(nn.Module):
    """Embedding -> num_layers x Block -> FinalNorm -> Head (or the tied embedding).

    forward(tokens (batch, seq) int64, labels=None) -> mean loss when labels are given (the output
    layer fused with the cross entropy unless cfg.loss_chunk_tokens is 0), else vocab-sharded
    logits (batch, seq, V_pad / p). Packed samples pass `positions` and `documents`
    (megalm.data.packing); under context parallelism tokens and labels are this rank's chunk and
    the loss is the whole sequence's. `logits_full` gathers the vocabulary and strips the padding
    for generation. The dropout tracker is tp.rng; the default generator is the trainer's to seed.
    With cfg.activation_checkpointing every block is recomputed in the backward pass.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.vocab_size, self.padded_vocab_size = cfg.vocab_size, padded_vocab(cfg, tp.size)
        self.embedding = Embedding(cfg, tp)
        self.blocks = nn.ModuleList(Block(cfg, i, tp) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg, tp)
        self.head = None if cfg.tie_embeddings else Head(cfg, tp)
        if cfg.arch == "llama":  # computed once, read by every block (not in the state dict)
            cos, sin = rope_cos_sin(torch.arange(cfg.max_seq_len), cfg, self.blocks[0].attn.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_fn = GPTLoss(cfg, tp)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.blocks, tp.rng)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
        positions: torch.Tensor | None = None, documents: torch.Tensor | None = None,
        start_pos: int = 0, cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        if cache is not None and (self.tp.sequence_parallel or self.tp.context is not None):
            raise MegalmError("the KV cache (generation) does not work with sequence or context parallelism")
        rope = (self.rope_cos, self.rope_sin) if self.cfg.arch == "llama" else None
        packing = Packing(positions, documents, start_pos, rope=rope)
        h = self.embedding(tokens, positions, start_pos)
        for i, block in enumerate(self.blocks):
            h = block(h, packing, None if cache is None else cache[i])
        h = self.final_norm(h)
        if labels is not None and self.cfg.loss_chunk_tokens > 0:
            weight = self.embedding.weight if self.head is None else self.head.weight
            return head_loss(h, weight, labels, self.cfg, self.tp)
        logits = self.embedding.logits(h) if self.head is None else self.head(h)
        return logits if labels is None else self.loss_fn(logits, labels)

    @torch.no_grad()
    def logits_full(
        self, tokens: torch.Tensor, *, start_pos: int = 0, cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Logits over the real vocabulary (batch, seq, V), gathered from the tensor ranks."""
        logits = gather_from_tensor_region(self(tokens, start_pos=start_pos, cache=cache), self.tp.group)
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
