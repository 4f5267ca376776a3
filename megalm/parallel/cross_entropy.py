"""Cross entropy over vocabulary-sharded logits; the full logits never exist on one rank.

Rank i holds z[:, V_i] for its vocabulary slice V_i. For a token with label y:

    m = max_j z_j                        (all-reduce MAX of local maxima; for stability)
    loss = log sum_j exp(z_j - m) - (z_y - m)
    sum_j exp(z_j - m)                    (all-reduce SUM of local sums)
    z_y - m                               (all-reduce SUM: only the rank whose slice holds y adds it)
    d loss / d z_j = softmax_j - [j = y]  (local: each rank writes its own slice)

Columns at or beyond `vocab_size` (the tensor-parallel padding) are set to -inf, so they take
no probability and get zero gradient. Labels equal to `ignore_index` give no loss or gradient.

`linear_cross_entropy` fuses the output layer into the loss: it walks the tokens in chunks, and
for each chunk computes the logits, the loss and, in the same pass, the gradients of the hidden
states and of the weight (the loss is a mean, so they only wait for a scalar in backward). The
(batch, seq, V / p) logits and their fp32 softmax never exist whole: memory holds one chunk.
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


def token_count(labels: torch.Tensor, ignore_index: int, count_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Tokens with a label here and on the other ranks of `count_group` (the other chunks of the
    same sequences under context parallelism), at least 1."""
    count = (labels != ignore_index).sum()
    _all_reduce(count, count_group, dist.ReduceOp.SUM)
    return count.clamp(min=1)


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    count_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Mean cross entropy over the tokens whose label is not ignore_index (fp32 scalar).

    logits_shard: (batch, seq, V_pad / p), this rank's vocabulary slice; labels: (batch, seq)
    global token ids. `vocab_size` (the tokenizer's V) masks the padding columns; None: no
    padding. Equal on every rank of `group`. With `count_group` the sum is divided by the token
    count of all its ranks: this rank's part of their mean.
    """
    loss = vocab_parallel_cross_entropy_per_token(logits_shard, labels, group, vocab_size, ignore_index)
    return loss.sum() / token_count(labels, ignore_index, count_group)


def _chunk_loss(
    z: torch.Tensor, labels: torch.Tensor, start: int, group: dist.ProcessGroup | None,
    ignore_index: int, grad_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token loss, d loss / d z or None) of one chunk of fp32 logits z (tokens, V / p), where
    d loss / d z = (softmax - onehot(label)) * grad_scale (per token, 0 where ignored). Eager, z
    is overwritten in place; under torch.compile the same formulas are written without mutation,
    which inductor fuses into a few passes."""
    m = z.amax(dim=-1)
    _all_reduce(m, group, dist.ReduceOp.MAX)
    ignored = labels == ignore_index
    local = labels - start
    mine = (local >= 0) & (local < z.size(-1)) & ~ignored
    local = local.masked_fill(~mine, 0)
    target = (torch.gather(z, -1, local.unsqueeze(-1)).squeeze(-1) - m).masked_fill(~mine, 0.0)
    _all_reduce(target, group, dist.ReduceOp.SUM)
    compiling = torch.compiler.is_compiling()
    exp = torch.exp(z - m.unsqueeze(-1)) if compiling else z.sub_(m.unsqueeze(-1)).exp_()
    sum_exp = exp.sum(dim=-1)
    _all_reduce(sum_exp, group, dist.ReduceOp.SUM)
    loss = (sum_exp.log() - target).masked_fill(ignored, 0.0)  # per token
    if grad_scale is None:
        return loss, None
    if compiling:
        onehot = (torch.arange(z.size(-1), device=z.device) == local.unsqueeze(-1)) & mine.unsqueeze(-1)
        return loss, (exp / sum_exp.unsqueeze(-1) - onehot.to(exp.dtype)) * grad_scale.unsqueeze(-1)
    exp.mul_((grad_scale / sum_exp).unsqueeze(-1))
    exp[torch.arange(z.size(0), device=z.device), local] -= grad_scale * mine
    return loss, exp


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, group, vocab_size, ignore_index, chunk, need_grad, count_group,  # noqa: D102
                token_losses):
        # h (tokens, d); weight (V_pad / p, d); labels (tokens,) int64. Returns the mean loss; writes each
        # token's loss into token_losses (tokens,) fp32 when given.
        per_rank = weight.size(0)
        start = group_rank(group) * per_rank
        pad_from = None if vocab_size is None or start + per_rank <= vocab_size else max(vocab_size - start, 0)
        valid = labels != ignore_index
        count = token_count(labels, ignore_index, count_group)
        scale = valid.to(torch.float32) / count if need_grad else None  # d mean / d token loss
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.size(0), chunk):
            h_c = h[i:i + chunk]
            z = (h_c @ weight.t()).float()
            if pad_from is not None:
                z[:, pad_from:] = float("-inf")  # padding columns: no probability, no gradient
            loss, grad_z = _chunk_loss(z, labels[i:i + chunk], start, group, ignore_index,
                                       None if scale is None else scale[i:i + chunk])
            total += loss.sum()
            if token_losses is not None:
                token_losses[i:i + chunk] = loss
            if need_grad:
                g = grad_z.to(h.dtype)
                torch.mm(g, weight, out=grad_h[i:i + chunk])
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h_c)
                else:
                    grad_w += g.t() @ h_c  # low-precision product, summed over chunks in fp32
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        grad_w = torch.mul(grad_w, grad_loss, out=torch.empty_like(grad_w, dtype=ctx.weight_dtype))
        return grad_h * grad_loss.to(grad_h.dtype), grad_w, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk: int = 1024,
    count_group: dist.ProcessGroup | None = None,
    token_losses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross entropy of the logits h W^T, computed `chunk` tokens at a time (fp32 scalar);
    with `token_losses` (fp32, one per token of labels), each token's loss written there too.

    h: (batch, seq, d) hidden states already in the tensor region (copied in, or gathered from
    sequence shards: the caller's mapping reduces the partial gradient); weight: (V_pad / p, d),
    this rank's vocabulary rows; labels: (batch, seq). Equals
    vocab_parallel_cross_entropy(h @ weight.T, labels, ...) without ever holding those logits
    (`count_group` as there).
    """
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        h.reshape(-1, h.size(-1)), weight, labels.reshape(-1), group, vocab_size, ignore_index, chunk, need_grad,
        count_group, token_losses,
    )
