"""Muon (optimizer.name=muon): the update of one weight matrix, whole or tensor-parallel, and the
optimizer that applies it to the hidden matrices and AdamW to the rest.

Muon (Keller Jordan 2024; "Muon is Scalable for LLM Training", Liu et al. 2025, Moonlight): keep a
momentum of the gradient, m = mu m + g, take u = g + mu m (Nesterov) or m, replace u by the nearest
semi-orthogonal matrix through a quintic Newton-Schulz iteration, and scale it so that its RMS matches
AdamW's (0.2 sqrt(max(rows, cols)): the AdamW learning rate and weight decay carry over):

    p <- p - lr (scale * NS(u) + weight_decay * p)

A fused weight is orthogonalised per logical matrix (`LogicalSplit`): megalm's attention holds q, k and
v in one matrix, grouped by kv head, and its MLP gate and up in one; Moonlight and Megatron-core
orthogonalise per projection, which is what the model would have with separate weights.

Under ZeRO 1/2 DeepSpeed hands the optimizer one flat partition per group, slices of several matrices
(`bind_flat_groups`, megalm.seams.zero_flat_groups: the layout). Muon's momentum is elementwise, so each
rank keeps its partition's; the update needs whole matrices: each rank all-gathers its group's u over the
ranks sharing the partitions (the group's bytes once per step, as ZeRO's own parameter all-gather),
orthogonalises the matrices its partition touches (a matrix across a partition boundary on both ranks:
DeepSpeed's choice too) and keeps its slice. A group is all Muon or all AdamW (megalm.training.optimizer).

A tensor-parallel rank holds a shard of each matrix; orthogonalising the shard is not orthogonalising
the matrix. `sharded_updates` spreads a step's matrices over the tensor ranks (each matrix one owner,
balanced by the iteration's FLOPs): one all-to-all brings each owner the shards of its matrices, the
owner orthogonalises them whole, a second all-to-all hands every rank its shard of every update. Each
rank sends and receives (T-1)/T of a matrix's bytes per matrix, as an all-gather would, and runs about
1/T of the Newton-Schulz work instead of all of it; every layout takes the same step.

Which parameters take Muon (`muon_matrices`): attention's q, k, v and output projections, the MLP's
(a MoE layer's shared expert's too) and every routed expert, each expert its own matrix (a batch of
E matrices). The embedding, the output head, norms, biases, the router and the shared-expert gate take
AdamW with the optimizer.* AdamW keys, exactly torch's AdamW. Both live in one torch optimizer over
megalm's usual parameter groups, so DeepSpeed and the checkpoints see the same groups in the same
order as with AdamW; a Muon matrix's state is its momentum buffer (one state, not two).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import ModelConfig, OptimizerConfig
from megalm.errors import MegalmError
from megalm.parallel.layers import shard_tensor, unshard_tensor
from megalm.parallel.mappings import group_rank, group_size
from megalm.seams import FlatGroup
from megalm.training.optimizer import nonfinite_gradients

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic's (a, b, c) of the reference implementation (Keller Jordan's Muon)."""


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T (the singular values pushed into ~[0.7, 1.2]), by `steps` quintic
    iterations X <- a X + (b A + c A^2) X, A = X X^T, on X = g / ||g||_F, in fp32, on the wide side."""
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def update_scale(rows: int, cols: int, rms: float = 0.2) -> float:
    """Moonlight's scale: rms x sqrt(max(rows, cols)) gives the update AdamW's RMS (about 0.2)."""
    return rms * math.sqrt(max(rows, cols))


@dataclass(frozen=True)
class LogicalSplit:
    """How a fused weight (rows = output features) splits into the matrices the model means:
    `split(full)` -> list of matrices, `join(parts)` -> the fused layout again."""

    split: Callable[[torch.Tensor], list[torch.Tensor]]
    join: Callable[[list[torch.Tensor]], torch.Tensor]

    @classmethod
    def whole(cls) -> LogicalSplit:
        return cls(lambda w: [w], lambda parts: parts[0])

    @classmethod
    def halves(cls) -> LogicalSplit:
        """[gate; up] along the rows (megalm's MLP fc1 and an expert's w1, at tensor size 1)."""
        return cls(lambda w: list(w.chunk(2, dim=-2)), lambda parts: torch.cat(parts, dim=-2))

    @classmethod
    def qkv(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> LogicalSplit:
        """megalm's fused attention input: per kv head, its group's query heads, then its key and value
        head (rows), as megalm.model.layers.Attention lays them out: q, k and v are three matrices."""
        per_group = num_heads // num_kv_heads

        def split(w: torch.Tensor) -> list[torch.Tensor]:
            g = w.view(num_kv_heads, per_group + 2, head_dim, w.size(-1))
            return [g[:, :per_group].reshape(-1, w.size(-1)), g[:, per_group].reshape(-1, w.size(-1)),
                    g[:, per_group + 1].reshape(-1, w.size(-1))]

        def join(parts: list[torch.Tensor]) -> torch.Tensor:
            q, k, v = parts
            cols = q.size(-1)
            grouped = torch.cat([q.view(num_kv_heads, per_group, head_dim, cols), k.view(num_kv_heads, 1, head_dim, cols),
                                 v.view(num_kv_heads, 1, head_dim, cols)], dim=1)
            return grouped.reshape(-1, cols)

        return cls(split, join)


def orthogonalized(u: torch.Tensor, split: LogicalSplit, steps: int = 5,
                   coefficients: tuple[float, float, float] = NS_COEFFICIENTS, rms: float = 0.2) -> torch.Tensor:
    """The scaled, orthogonalised update of a whole (fused) matrix u: each logical matrix on its own."""
    parts = [newton_schulz(p, steps, coefficients) * update_scale(p.size(-2), p.size(-1), rms) for p in split.split(u)]
    return split.join(parts).to(u.dtype)


def ns_flops(shape: torch.Size | tuple[int, ...], steps: int) -> int:
    """About the Newton-Schulz FLOPs of a (batch of) matrix of `shape`: per step 3 products of the
    wide side (X X^T, A A and (bA + cA^2) X), m^2 n + m^3 + m^2 n with m <= n."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return math.prod(batch) * steps * 2 * (2 * m * m * n + m**3)


def owners(costs: list[int], world: int) -> list[int]:
    """Each item's rank: the largest first, each to the least loaded rank (ties: the lowest), so every
    rank computes the same assignment from the shapes alone."""
    load, owner = [0] * world, [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        owner[k] = min(range(world), key=lambda r: (load[r], r))
        load[owner[k]] += costs[k]
    return owner


def sharded_updates(items: list[tuple[torch.Tensor, MuonMatrix]], group: dist.ProcessGroup | None,
                    steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                    rms: float = 0.2) -> list[torch.Tensor]:
    """This tensor rank's shard of the orthogonalised update of each matrix whose shards the tensor
    ranks hold as `u` (split as `matrix.dim`/`matrix.stride`, megalm.parallel.layers.shard_tensor; dim
    -1: every rank holds it whole). Every tensor rank passes the same matrices in the same order."""
    kwargs = dict(steps=steps, coefficients=coefficients, rms=rms)
    world, rank = group_size(group), group_rank(group)
    out: list[torch.Tensor | None] = [None] * len(items)
    sharded = [k for k, (_, m) in enumerate(items) if world > 1 and m.dim >= 0]
    for k, (u, matrix) in enumerate(items):
        if world == 1 or matrix.dim < 0:
            out[k] = orthogonalized(u, matrix.split, **kwargs)
    if not sharded:
        return out
    whole = [(*items[k][0].shape[:items[k][1].dim], items[k][0].size(items[k][1].dim) * world,
              *items[k][0].shape[items[k][1].dim + 1:]) for k in sharded]
    owner = owners([ns_flops(shape, steps) for shape in whole], world)
    mine = [i for i, o in enumerate(owner) if o == rank]
    sizes = [items[k][0].numel() for k in sharded]
    by_owner = [[i for i, o in enumerate(owner) if o == r] for r in range(world)]
    send = torch.cat([items[sharded[i]][0].reshape(-1).float() for r in range(world) for i in by_owner[r]])
    received = torch.empty(world * sum(sizes[i] for i in mine), dtype=torch.float32, device=send.device)
    dist.all_to_all_single(received, send, output_split_sizes=[sum(sizes[i] for i in mine)] * world,
                           input_split_sizes=[sum(sizes[i] for i in by_owner[r]) for r in range(world)], group=group)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]  # pieces[r]: rank r's shards of my updates
    for s, chunk in enumerate(received.split(sum(sizes[i] for i in mine))):
        for i, flat in zip(mine, chunk.split([sizes[i] for i in mine]), strict=True):
            pieces[s].append(flat.view(items[sharded[i]][0].shape))
    back = []
    for j, i in enumerate(mine):
        u, matrix = items[sharded[i]]
        full = orthogonalized(unshard_tensor([pieces[s][j] for s in range(world)], matrix.dim, matrix.stride),
                              matrix.split, **kwargs)
        back.append([shard_tensor(full, matrix.dim, r, world, matrix.stride) for r in range(world)])
    send = torch.cat([back[j][r].reshape(-1) for r in range(world) for j in range(len(mine))]) if mine else \
        torch.empty(0, dtype=torch.float32, device=received.device)
    returned = torch.empty(sum(sizes), dtype=torch.float32, device=send.device)
    dist.all_to_all_single(returned, send, output_split_sizes=[sum(sizes[i] for i in by_owner[r]) for r in range(world)],
                           input_split_sizes=[sum(sizes[i] for i in mine)] * world, group=group)
    flats = iter(returned.split([sizes[i] for r in range(world) for i in by_owner[r]]))
    for r in range(world):
        for i in by_owner[r]:
            u = items[sharded[i]][0]
            out[sharded[i]] = next(flats).view(u.shape).to(u.dtype)
    return out


@dataclass(frozen=True)
class MuonMatrix:
    """How Muon treats one parameter: its logical split and its tensor-parallel sharding (dim -1: whole)."""

    split: LogicalSplit
    dim: int
    stride: int


def muon_matrices(model: nn.Module, cfg: ModelConfig) -> dict[int, MuonMatrix]:
    """id(parameter) -> MuonMatrix of every parameter that takes Muon (module docstring)."""
    from megalm.model.layers import MLP, Attention  # noqa: PLC0415 - the model imports the training package's users
    from megalm.model.moe import GroupedExperts  # noqa: PLC0415

    found: dict[int, MuonMatrix] = {}

    def add(p: nn.Parameter, split: LogicalSplit) -> None:
        sharded = getattr(p, "tensor_model_parallel", False)
        found[id(p)] = MuonMatrix(split, p.partition_dim if sharded else -1, p.partition_stride if sharded else 1)

    for module in model.modules():
        if isinstance(module, Attention):
            add(module.qkv.weight, LogicalSplit.qkv(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))
            add(module.proj.weight, LogicalSplit.whole())
        elif isinstance(module, MLP):
            add(module.fc1.weight, LogicalSplit.halves() if module.gated else LogicalSplit.whole())
            add(module.fc2.weight, LogicalSplit.whole())
        elif isinstance(module, GroupedExperts):
            add(module.w1, LogicalSplit.halves())
            add(module.w2, LogicalSplit.whole())
    return found


class Muon(torch.optim.Optimizer):
    """Muon for the parameters in `matrices`, torch's AdamW for the others, over megalm's parameter
    groups (lr and weight_decay per group, as the schedule sets them); skips the whole update when a
    gradient on any rank is non-finite (`overflow`, read by DeepSpeed's engine), when `guard`."""

    def __init__(self, groups: list[dict], cfg: OptimizerConfig, matrices: dict[int, MuonMatrix],
                 tensor_group: dist.ProcessGroup | None, guard: bool = True) -> None:
        super().__init__(groups, dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.cfg, self.tensor_group, self.guard = cfg, tensor_group, guard
        # by position in the groups, not by tensor: DeepSpeed's ZeRO-0 bf16/fp16 wrapper steps fp32 copies
        # of the parameters, in the same groups and order
        self.matrices = {(i, j): (matrices[id(p)], tuple(p.shape)) for i, g in enumerate(self.param_groups)
                         for j, p in enumerate(g["params"]) if id(p) in matrices}
        if len(self.matrices) != len(matrices):
            raise MegalmError("Muon: some of the model's matrices are in no parameter group")
        self.matrix_of = matrices
        self.flat: dict[int, FlatGroup] = {}  # id(a ZeRO-1/2 flat partition) -> its layout
        self.overflow = False

    def bind_flat_groups(self, layouts: list[FlatGroup] | None) -> None:
        """Under ZeRO 1/2 (megalm.seams.zero_flat_groups, after deepspeed.initialize): each group's
        parameter is now this rank's flat partition of the group's parameters, laid out as `layouts`."""
        if layouts is None:
            return
        for group, layout in zip(self.param_groups, layouts, strict=True):
            muon = [id(p) in self.matrix_of for p in layout.params]
            if any(muon) != all(muon) or all(muon) != bool(group.get("muon")):
                raise MegalmError(f"Muon: group {group.get('name')} mixes Muon matrices and AdamW parameters")
            (flat,) = group["params"]
            self.flat[id(flat)] = layout

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = self.guard and nonfinite_gradients(grads, None)
        if self.overflow:
            return None
        pending = []  # the whole matrices' (p, group, u, matrix): orthogonalised together, spread over tensor ranks
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if id(p) in self.flat:  # ZeRO 1/2 (which steps one group at a time: not by position)
                    self._flat_muon(p, group) if group.get("muon") else self._adamw(p, group)
                    continue
                matrix, shape = self.matrices.get((i, j), (None, None))
                if matrix is None:
                    self._adamw(p, group)
                    continue
                if tuple(p.shape) != shape:  # not the tensors it was built over: never AdamW on them silently
                    raise MegalmError(f"Muon: parameter {j} of group {i} has shape {tuple(p.shape)}, the matrix it "
                                      f"was built for {shape}: its groups were rearranged")
                pending.append((p, group, self._momentum(p), matrix))
        updates = self._updates([(u, matrix) for _, _, u, matrix in pending])
        for (p, group, _, _), update in zip(pending, updates, strict=True):
            self._apply(p, group, update)
        return None

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        """Move p's momentum buffer (elementwise: whole or a flat partition alike); the u to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        g, buf, mu = p.grad.float(), state["momentum_buffer"], self.cfg.muon_momentum
        buf.mul_(mu).add_(g)
        return g.add(buf, alpha=mu) if self.cfg.muon_nesterov else buf

    def _updates(self, items: list[tuple[torch.Tensor, MuonMatrix]]) -> list[torch.Tensor]:
        o = self.cfg
        return sharded_updates(items, self.tensor_group, steps=o.muon_ns_steps,
                               coefficients=tuple(o.muon_ns_coefficients), rms=o.muon_update_rms)

    @staticmethod
    def _apply(p: torch.Tensor, group: dict, update: torch.Tensor) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])

    def _flat_muon(self, flat: torch.Tensor, group: dict) -> None:
        """Muon on this rank's ZeRO-1/2 partition `flat` of a group of Muon matrices (module docstring)."""
        layout, u = self.flat[id(flat)], self._momentum(flat)
        n, rank = layout.partition_numel, group_rank(layout.group)
        parts = [torch.empty_like(u) for _ in range(group_size(layout.group))]
        dist.all_gather(parts, u.contiguous(), group=layout.group) if len(parts) > 1 else parts[0].copy_(u)
        whole, lo = torch.cat(parts), rank * n
        update = torch.zeros_like(u)
        touched = [(p, offset) for p, offset in zip(layout.params, layout.offsets, strict=True)  # the same order on
                   if max(offset, lo) < min(offset + p.numel(), lo + n)]                          # every tensor rank
        updates = self._updates([(whole[offset:offset + p.numel()].view(p.shape), self.matrix_of[id(p)])
                                 for p, offset in touched])
        for (p, offset), matrix in zip(touched, updates, strict=True):
            start, end = max(offset, lo), min(offset + p.numel(), lo + n)
            update[start - lo:end - lo] = matrix.reshape(-1)[start - offset:end - offset]
        self._apply(flat, group, update)

    def init_state(self, group: dict, p: torch.Tensor, step: float) -> dict:
        """p's state as its first step makes it (megalm.seams.prepare_optimizer_state, before a resume
        writes it): a Muon group's momentum buffer, else AdamW's moments, at `step`."""
        state = self.state[p]
        if group.get("muon"):
            state.setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            return state
        state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
        state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step))
        return state

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's update (amsgrad off), written out."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
