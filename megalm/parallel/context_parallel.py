"""Context parallelism: each of C ranks holds 1/C of every sequence, from the data loader on.

Everything in a transformer block but attention works token by token, so it runs on the chunk.
Attention needs whole sequences; DeepSpeed's Ulysses (`DistributedAttention`) gets them by an
all-to-all over the context group that trades the sequence split for a head split:

    q, k, v  (batch, seq / C, heads, d)  --all-to-all-->  (batch, seq, heads / C, d)
    attention over whole sequences, any kernel (causal SDPA, per-document masks)
    out      (batch, seq, heads / C, d)  --all-to-all-->  (batch, seq / C, heads, d)

Why Ulysses rather than a ring (Megatron's context parallel, torchtitan): the local attention is
the ordinary kernel on the ordinary sequence, so document masking, GQA and every fused kernel work
unchanged and the loss equals one rank's to rounding; communication is two all-to-alls of q, k, v
and the output per layer, independent of C per rank. Its limit is C <= kv heads / tensor size
(heads divide by tensor x context). A ring would lift that limit at the price of a second
attention implementation with its own masks and load balancing.

RoPE is applied before the all-to-all at each token's global position (the chunk's offset; see
`chunk_positions`). The loss of a rank is its tokens' sum over the token count of the whole
sequence (`megalm.parallel.loss`), and `sum_partial_losses` adds the C partial losses in the
forward pass while each rank back-propagates its own: DeepSpeed then sums gradients over context
ranks and averages them over data ranks (megalm.parallel.groups.DeepSpeedMPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megalm.parallel.mappings import group_rank, reduce_from_tensor_region


def chunk_positions(seq_chunk: int, group: dist.ProcessGroup | None, device: torch.device, start: int = 0) -> torch.Tensor:
    """(seq_chunk,) global positions of this rank's contiguous chunk of the sequence."""
    offset = start + group_rank(group) * seq_chunk
    return torch.arange(offset, offset + seq_chunk, device=device)


def sum_partial_losses(loss: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: all-reduce the context ranks' partial losses into the sequence's loss (equal on
    every rank); backward: copy (each rank differentiates its own part)."""
    return reduce_from_tensor_region(loss, group)


class UlyssesAttention:
    """attention(q, k, v, **kw) on (batch, seq / C, heads, d) chunks, computed by `local` on whole
    sequences of heads / C heads: local(q, k, v, **kw) takes and returns (batch, seq, heads', d)."""

    def __init__(self, local: Callable[..., torch.Tensor], group: dist.ProcessGroup) -> None:
        from deepspeed.sequence.layer import DistributedAttention  # noqa: PLC0415 - heavy, only under CP

        self.attention = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.attention(q, k, v, 0, None, **kwargs)  # batch dim 0; RoPE applied by the caller
