"""Communication regions of Megatron-style tensor parallelism, as autograd functions.

Each function is named for the region it opens or closes and documents both directions, as in
Megatron-LM's `tensor_parallel/mappings.py`. With p = size of the tensor group:

    copy_to_tensor_region          forward: copy            backward: all-reduce
    reduce_from_tensor_region      forward: all-reduce      backward: copy
    scatter_to_tensor_region       forward: split last dim  backward: all-gather last dim
    gather_from_tensor_region      forward: all-gather last dim  backward: split last dim
    scatter_to_sequence_region     forward: split seq dim   backward: all-gather seq dim
    gather_from_sequence_region    forward: all-gather seq  backward: reduce-scatter seq (or split)
    reduce_scatter_to_sequence_region  forward: reduce-scatter seq  backward: all-gather seq

Activations are (batch, seq, hidden): the sequence dimension is 1. `group=None` (or a group of
one rank) means no tensor parallelism: every function returns its input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.errors import MegalmError

SEQ_DIM = 1
"""Sequence dimension of (batch, seq, hidden) activations."""

# torch >= 2.13 renames the dim-0 collectives (the old names warn); older torch has only the old.
_all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_dim0 = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; 1 for None (no tensor parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- raw collectives


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.contiguous().clone()  # never modify a tensor autograd may have saved
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world, rank = group_size(group), group_rank(group)
    if x.size(dim) % world != 0:
        raise MegalmError(
            f"cannot split dimension {dim} of size {x.size(dim)} over {world} tensor-parallel ranks"
            " (with sequence parallelism the sequence length must divide by parallel.tensor)"
        )
    chunk = x.size(dim) // world
    return x.narrow(dim, rank * chunk, chunk).contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = group_size(group)
    inp = x.movedim(dim, 0).contiguous()  # the collective concatenates along dim 0
    out = inp.new_empty((inp.size(0) * world, *inp.shape[1:]))
    _all_gather_dim0(out, inp, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = group_size(group)
    if x.size(dim) % world != 0:
        raise MegalmError(
            f"cannot reduce-scatter dimension {dim} of size {x.size(dim)} over {world} ranks"
            " (the sequence length must divide by parallel.tensor)"
        )
    inp = x.movedim(dim, 0).contiguous()
    out = inp.new_empty((inp.size(0) // world, *inp.shape[1:]))
    _reduce_scatter_dim0(out, inp, group=group)
    return out.movedim(0, dim).contiguous()


# ----------------------------------------------------------------------------- autograd regions


class _CopyToTensorRegion(torch.autograd.Function):
    """forward: copy, backward: all-reduce (Megatron's `f`, entering a tensor-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorRegion(torch.autograd.Function):
    """forward: all-reduce, backward: copy (Megatron's `g`, leaving a tensor-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class _ScatterToTensorRegion(torch.autograd.Function):
    """forward: split the last dim, keep this rank's chunk; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _all_gather(grad, grad.dim() - 1, ctx.group), None


class _GatherFromTensorRegion(torch.autograd.Function):
    """forward: all-gather the last dim; backward: split the last dim."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return _all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _split(grad, -1, ctx.group), None


class _ScatterToSequenceRegion(torch.autograd.Function):
    """forward: split the sequence dim; backward: all-gather the sequence dim."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    """forward: all-gather the sequence dim; backward: reduce-scatter the sequence dim when the
    output feeds a tensor-parallel region (each rank holds a partial gradient), else split."""

    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):  # noqa: D102
        ctx.group = group
        ctx.reduce = tensor_parallel_output_grad
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.reduce:
            return _reduce_scatter(grad, SEQ_DIM, ctx.group), None, None
        return _split(grad, SEQ_DIM, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    """forward: reduce-scatter the sequence dim; backward: all-gather the sequence dim."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: copy, backward: all-reduce. Before a column-parallel matmul: each rank's
    gradient with respect to X is partial (dX = sum_i dY_i A_i^T) and is summed here."""
    return x if group_size(group) == 1 else _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: all-reduce, backward: copy. After a row-parallel matmul: Y = sum_i X_i A_i."""
    return x if group_size(group) == 1 else _ReduceFromTensorRegion.apply(x, group)


def scatter_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: split the last dim (keep chunk `rank`), backward: all-gather the last dim."""
    return x if group_size(group) == 1 else _ScatterToTensorRegion.apply(x, group)


def gather_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: all-gather the last dim, backward: split the last dim."""
    return x if group_size(group) == 1 else _GatherFromTensorRegion.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """forward: split the sequence dim, backward: all-gather the sequence dim."""
    return x if group_size(group) == 1 else _ScatterToSequenceRegion.apply(x, group)


def gather_from_sequence_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """forward: all-gather the sequence dim, backward: reduce-scatter (or split when
    `tensor_parallel_output_grad` is False: the consumer's gradient is already complete)."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """forward: reduce-scatter the sequence dim, backward: all-gather the sequence dim. After a
    row-parallel matmul under sequence parallelism: Y_shard = (sum_i X_i A_i)[seq chunk rank]."""
    return x if group_size(group) == 1 else _ReduceScatterToSequenceRegion.apply(x, group)


def _exchange_rows(x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _ExchangeRows(torch.autograd.Function):
    """forward: variable-split all-to-all of rows; backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, recv, send, group):  # noqa: D102
        ctx.recv, ctx.send, ctx.group = recv, send, group
        return _exchange_rows(x, recv, send, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _exchange_rows(grad, ctx.send, ctx.recv, ctx.group), None, None, None


def exchange_rows(x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows x[sum(send[:j]) : sum(send[:j+1])] go to rank j of `group`; recv[j] rows arrive from
    rank j, in rank order (expert parallelism's token dispatch). Backward: the reverse exchange."""
    return _ExchangeRows.apply(x, recv, send, group)
