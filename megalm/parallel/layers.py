"""Tensor-parallel layers (Megatron-LM style): column- and row-parallel linear, vocab-parallel
embedding, parameter marking and the sequence-parallel gradient reduction.

Every layer takes its tensor group as a required argument; `group=None` means no tensor
parallelism. Sharded parameters carry `tensor_model_parallel = True`, `partition_dim` and
`partition_stride` (DeepSpeed reads `tensor_model_parallel` to count replicated parameters once
in the global gradient norm; resharding reads the other two). Replicated parameters carry
`tensor_model_parallel = False`; those that see only a sequence shard under sequence
parallelism also carry `sequence_parallel = True` and are used through
`sequence_parallel_param`, whose backward all-reduces their gradient over the tensor group, so
the gradient is complete when backward returns (under ZeRO 2/3 hooks and the pipeline engine too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.errors import MegalmError
from megalm.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_sequence_region,
    gather_from_tensor_region,
    group_rank,
    group_size,
    reduce_from_tensor_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tensor_region,
)
from megalm.parallel.random import InitMethod

# ----------------------------------------------------------------------------- sharding helpers


def shard_tensor(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """Rank's partition of `full` along `dim`: split into world*stride equal chunks and keep
    chunks rank, rank+world, ... (stride 1: one contiguous chunk; stride 2: e.g. [gate_i; up_i])."""
    if full.size(dim) % (world * stride) != 0:
        raise MegalmError(f"dimension {dim} of size {full.size(dim)} does not divide into {world * stride} chunks")
    chunks = full.chunk(world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).contiguous()


def unshard_tensor(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of shard_tensor: the full tensor from every rank's partition, in rank order."""
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def mark_sharded(param: nn.Parameter, dim: int, stride: int = 1) -> None:
    """Megatron/DeepSpeed attributes of a tensor-parallel partition."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def mark_replicated(module: nn.Module, sequence_parallel: bool) -> None:
    """Mark every parameter of `module` as replicated on the tensor ranks; under sequence
    parallelism each rank's gradient is partial (it saw one sequence shard)."""
    for p in module.parameters():
        mark_replicated_param(p, sequence_parallel)


def mark_replicated_param(param: nn.Parameter, sequence_parallel: bool) -> None:
    """Replicated on the tensor ranks; `sequence_parallel`: its gradient needs a tensor all-reduce."""
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1
    param.sequence_parallel = sequence_parallel


def _sharded_parameter(
    shape: tuple[int, int], dim: int, group: dist.ProcessGroup | None, init_method: InitMethod, stride: int
) -> nn.Parameter:
    full = torch.empty(shape, dtype=torch.float32)
    init_method(full)
    param = nn.Parameter(shard_tensor(full, dim, group_rank(group), group_size(group), stride))
    mark_sharded(param, dim, stride)
    return param


def _divide(n: int, group: dist.ProcessGroup | None, what: str) -> int:
    world = group_size(group)
    if n % world != 0:
        raise MegalmError(f"{what} ({n}) must divide by the tensor-parallel size ({world})")
    return n // world


# ----------------------------------------------------------------------------- linear layers


def column_parallel_input(x: torch.Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """X entering a column-parallel layer: copied (backward: all-reduce of the partial gradients)
    or, under sequence parallelism, all-gathered from its sequence shards (backward: reduce-scatter)."""
    if sequence_parallel:
        return gather_from_sequence_region(x, group, tensor_parallel_output_grad=True)
    return copy_to_tensor_region(x, group)


def column_parallel_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: dist.ProcessGroup | None,
    sequence_parallel: bool,
    gather_output: bool = False,
) -> torch.Tensor:
    """Y_i = X A_i^T + b_i with this rank's rows A_i of A = [A_1; ...; A_p] (torch layout
    (out, in)). X enters the region through column_parallel_input."""
    y = F.linear(column_parallel_input(x, group, sequence_parallel), weight, bias)  # (batch, seq, out / p)
    return gather_from_tensor_region(y, group) if gather_output else y


class ColumnParallelLinear(nn.Module):
    """Y = XA + b, A = [A_1 ... A_p] along its second dimension (output features); rank i holds
    A_i and b_i and computes Y_i = X A_i + b_i.

    `gather_output` all-gathers Y (else Y stays split for a following RowParallelLinear).
    `stride` > 1 interleaves fused matrices: with stride 2 and A = [G, U], rank i holds
    [G_i, U_i] (SwiGLU's gate and up). Under `sequence_parallel` X arrives as a sequence shard.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup | None,
        init_method: InitMethod,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        stride: int = 1,
    ) -> None:
        super().__init__()
        if gather_output and sequence_parallel:
            raise MegalmError("ColumnParallelLinear: gather_output with sequence_parallel is not supported")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        _divide(out_features, group, "output features of a column-parallel linear")
        self.weight = _sharded_parameter((out_features, in_features), 0, group, init_method, stride)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // group_size(group)))
            mark_sharded(self.bias, 0, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_matmul(
            x, self.weight, self.bias, self.group, self.sequence_parallel, self.gather_output
        )


class RowParallelLinear(nn.Module):
    """Y = XA + b, A = [A_1; ...; A_p] along its first dimension (input features) and
    X = [X_1 ... X_p] along its last; rank i computes X_i A_i and Y = sum_i X_i A_i + b.

    The sum is an all-reduce, or a reduce-scatter to sequence shards under sequence parallelism.
    The bias is replicated and added after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup | None,
        init_method: InitMethod,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise MegalmError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        _divide(in_features, group, "input features of a row-parallel linear")
        self.weight = _sharded_parameter((out_features, in_features), 1, group, init_method, 1)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            mark_replicated_param(self.bias, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_region(x, self.group)
        y = F.linear(x, self.weight)  # (batch, seq, out) partial sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.group)  # (batch, seq / p, out)
        else:
            y = reduce_from_tensor_region(y, self.group)
        return y if self.bias is None else y + sequence_parallel_param(self.bias, self.group, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """E = onehot(tokens) W with W split along the vocabulary: rank i holds rows
    [i V_pad / p, (i + 1) V_pad / p), looks up the tokens in its range, zeros the others, and the
    partial results are all-reduced. V_pad (megalm.parallel.vocab) >= the tokenizer's V; the
    padding rows start at zero and no real token reads them.
    """

    def __init__(
        self,
        padded_vocab: int,
        embedding_dim: int,
        *,
        group: dist.ProcessGroup | None,
        init_method: InitMethod,
    ) -> None:
        super().__init__()
        self.group = group
        per_rank = _divide(padded_vocab, group, "padded vocabulary size")
        self.vocab_start = group_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _sharded_parameter((padded_vocab, embedding_dim), 0, group, init_method, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(out, self.group)  # (batch, seq, hidden)


# ----------------------------------------------------------------------------- sequence parallel


def sequence_parallel_param(
    param: torch.Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool
) -> torch.Tensor:
    """A replicated parameter applied to this rank's sequence shard.

    Each tensor rank's gradient covers only its shard of the sequence; the true gradient is the
    sum over the tensor ranks. Passing the parameter through the region "forward: copy, backward:
    all-reduce" performs that sum inside autograd, before any gradient hook (ZeRO's reduction)
    or optimizer step sees it.
    """
    return copy_to_tensor_region(param, group) if sequence_parallel else param
