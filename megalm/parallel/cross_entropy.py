"""Cross entropy over vocabulary-sharded logits; the full logits never exist on one rank.

Rank i holds z[:, V_i] for its vocabulary slice V_i. For a token with label y:

    m = max_j z_j                        (all-reduce MAX of local maxima; for stability)
    loss = log sum_j exp(z_j - m) - (z_y - m)
    sum_j exp(z_j - m)                    (all-reduce SUM of local sums)
    z_y - m                               (all-reduce SUM: only the rank whose slice holds y adds it)
    d loss / d z_j = softmax_j - [j = y]  (local: each rank writes its own slice)

Columns at or beyond `vocab_size` (the tensor-parallel padding) are set to -inf, so they take
no probability and get zero gradient. Labels equal to `ignore_index` give no loss or gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.parallel.mappings import group_rank, group_size

IGNORE_INDEX = -100
"""Label value that contributes neither loss nor gradient (as torch's cross_entropy)."""


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_size, ignore_index):  # noqa: D102
        # logits (batch, seq, V_pad / p) any float dtype; labels (batch, seq) int64
        z = logits.float()
        per_rank = z.size(-1)
        start = group_rank(group) * per_rank
        if vocab_size is not None and start + per_rank > vocab_size:
            z = z.clone()
            z[..., max(vocab_size - start, 0):] = float("-inf")  # padding columns
        m = z.max(dim=-1).values
        _all_reduce(m, group, dist.ReduceOp.MAX)
        z = z - m.unsqueeze(-1)

        ignored = labels == ignore_index
        local = labels - start
        mine = (local >= 0) & (local < per_rank) & ~ignored
        local = local.masked_fill(~mine, 0)
        target = torch.gather(z, -1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        _all_reduce(target, group, dist.ReduceOp.SUM)

        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, group, dist.ReduceOp.SUM)
        loss = (sum_exp.log() - target).masked_fill(ignored, 0.0)  # (batch, seq)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine, ignored)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        softmax, local, mine, ignored = ctx.saved_tensors
        grad = softmax  # reuse the buffer: d loss / d z = softmax - onehot(label)
        onehot_rows = grad.view(-1, grad.size(-1))
        flat = torch.arange(onehot_rows.size(0), device=grad.device)
        onehot_rows[flat, local.view(-1)] -= mine.view(-1).to(grad.dtype)
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return (grad * scale).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy_per_token(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token loss (batch, seq) in fp32; 0 where labels == ignore_index."""
    return _VocabParallelCrossEntropy.apply(logits_shard, labels, group, vocab_size, ignore_index)


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross entropy over the tokens whose label is not ignore_index (fp32 scalar).

    logits_shard: (batch, seq, V_pad / p), this rank's vocabulary slice; labels: (batch, seq)
    global token ids. `vocab_size` (the tokenizer's V) masks the padding columns; None: no
    padding. Equal on every rank of `group`.
    """
    loss = vocab_parallel_cross_entropy_per_token(logits_shard, labels, group, vocab_size, ignore_index)
    count = (labels != ignore_index).sum().clamp(min=1)
    return loss.sum() / count
