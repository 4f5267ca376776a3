"""The language-model loss under tensor and sequence parallelism, for GPT and the pipeline.

Two ways to the same mean token loss (megalm.parallel.cross_entropy has the math):

    fused (model.loss_chunk_tokens > 0)   head_loss / HeadLoss: the output layer and the
                                          vocab-parallel cross entropy, a chunk of tokens at a time
    unfused (model.loss_chunk_tokens 0)   GPTLoss: vocab-sharded logits first, then the loss

A pipeline's last stage uses HeadLoss as DeepSpeed's loss_fn: its last layer passes the final
hidden states through and the loss applies that layer's weight.

Under context parallelism each rank holds a chunk of every sequence: its loss is its tokens' sum
over the whole sequences' token count, and the chunks' parts are added in the forward pass only
(megalm.parallel.context_parallel.sum_partial_losses), so every rank reports the mean over all
tokens, each counted once, and back-propagates its own part.
"""

from __future__ import annotations

import torch
from torch import nn

from megalm.config import ModelConfig
from megalm.parallel.context import TensorParallel
from megalm.parallel.context_parallel import sum_partial_losses
from megalm.parallel.cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    token_count,
    vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy_per_token,
)
from megalm.parallel.layers import column_parallel_input


class SampleLosses:
    """Each sample's summed token loss and label count in the last micro batch whose loss this rank
    computed (detached, fp32), kept when `enabled`: the per-source training loss is made of them
    (megalm.training.data). No extra forward: the loss functions compute per-token losses anyway."""

    def __init__(self) -> None:
        self.enabled = False
        self.sums: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def record(self, token_losses: torch.Tensor, labels: torch.Tensor) -> None:
        """token_losses and labels (batch, seq) of this rank (its sequence chunk under context parallelism)."""
        self.sums, self.tokens = token_losses.detach().sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        out = (self.sums, self.tokens)
        self.sums = self.tokens = None
        return out


SAMPLE_LOSSES = SampleLosses()


def head_loss(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cfg: ModelConfig, tp: TensorParallel,
) -> torch.Tensor:
    """Mean loss of the output layer `weight` (V_pad / p, d) on the final hidden states h
    (batch, seq[/p], d), fused with the cross entropy cfg.loss_chunk_tokens tokens at a time."""
    x = column_parallel_input(h, tp.group, tp.sequence_parallel)
    per_token = torch.empty(labels.shape, dtype=torch.float32, device=h.device) if SAMPLE_LOSSES.enabled else None
    loss = linear_cross_entropy(x, weight, labels, tp.group, cfg.vocab_size, IGNORE_INDEX, cfg.loss_chunk_tokens,
                                count_group=tp.context, token_losses=None if per_token is None else per_token.view(-1))
    if per_token is not None:
        SAMPLE_LOSSES.record(per_token, labels)
    return sum_partial_losses(loss, tp.context)


class HeadLoss:
    """loss_fn(h, labels) of a pipeline whose last layer passes the final hidden states through:
    `owner` (the last stage's Head or tied embedding copy) holds the output weight."""

    def __init__(self, cfg: ModelConfig, owner: nn.Module, tp: TensorParallel) -> None:
        self.cfg, self.owner, self.tp = cfg, owner, tp

    def __call__(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return head_loss(h, self.owner.weight, labels, self.cfg, self.tp)


class GPTLoss:
    """loss_fn(logits_shard, labels) -> mean token loss, for GPT and DeepSpeed's PipelineModule."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        self.vocab_size, self.group, self.context = cfg.vocab_size, tp.group, tp.context

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if SAMPLE_LOSSES.enabled:  # vocab_parallel_cross_entropy, its per-token losses kept
            per_token = vocab_parallel_cross_entropy_per_token(logits, labels, self.group, self.vocab_size, IGNORE_INDEX)
            SAMPLE_LOSSES.record(per_token, labels)
            loss = per_token.sum() / token_count(labels, IGNORE_INDEX, self.context)
        else:
            loss = vocab_parallel_cross_entropy(logits, labels, self.group, self.vocab_size, IGNORE_INDEX, self.context)
        return sum_partial_losses(loss, self.context)
