"""TensorParallel: the one object every model constructor takes for how the model is split.

It replaces the arguments that used to travel together through every constructor (the tensor
group, the sequence-parallel flag, the seed, the dropout RNG tracker and the context group) and
normalises them once: a group of one rank is no parallelism on that axis (None), and sequence
parallelism only exists with more than one tensor rank. The context group is here too because it
changes the same modules: attention all-to-alls over it (megalm.parallel.context_parallel), the
loss counts tokens over it and positions are offset by the chunk's place in the sequence.

    tp = TensorParallel.from_groups(groups, sequence_parallel=True, seed=1234)  # in training
    tp = TensorParallel.build(None, seed=1234)                                  # one process
    GPT(model_cfg, tp)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megalm.parallel.groups import ProcessGroups
from megalm.parallel.mappings import group_rank, group_size
from megalm.parallel.random import TensorParallelRNG


@dataclass(frozen=True)
class TensorParallel:
    """How this rank's model is split over the tensor axis.

    group:             the tensor group; None without tensor parallelism
    sequence_parallel: norms, dropout and residuals hold a 1/size shard of the sequence
    seed:              the run seed; each module seeds its initialisation from (seed, its name)
    rng:               dropout inside tensor-parallel regions (seed + 2718 + tensor rank), shared
                       by every module of the model, so activation recomputation can replay it
    context:           the context-parallel group (each rank holds 1/size of every sequence);
                       None without context parallelism
    expert:            the expert-parallel group (each rank holds 1/size of every MoE layer's
                       experts; tokens are exchanged over it); None without expert parallelism
    """

    group: dist.ProcessGroup | None
    sequence_parallel: bool
    seed: int
    rng: TensorParallelRNG
    context: dist.ProcessGroup | None = None
    expert: dist.ProcessGroup | None = None

    @classmethod
    def build(
        cls, group: dist.ProcessGroup | None = None, *, sequence_parallel: bool = False, seed: int = 1234,
        context: dist.ProcessGroup | None = None, expert: dist.ProcessGroup | None = None,
    ) -> TensorParallel:
        """The context of `group` (None, or a group of one rank: no tensor parallelism) and of the
        context and expert groups (likewise)."""
        group, context, expert = (g if group_size(g) > 1 else None for g in (group, context, expert))
        rng = TensorParallelRNG(seed, group_rank(group))
        return cls(group, sequence_parallel and group is not None, seed, rng, context, expert)

    @classmethod
    def from_groups(cls, groups: ProcessGroups, *, sequence_parallel: bool, seed: int) -> TensorParallel:
        """The context of this rank's tensor and context groups in the run's mesh."""
        return cls.build(groups.tensor, sequence_parallel=sequence_parallel, seed=seed, context=groups.context,
                         expert=groups.expert)

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    @property
    def context_size(self) -> int:
        return group_size(self.context)

    @property
    def context_rank(self) -> int:
        return group_rank(self.context)

    @property
    def expert_size(self) -> int:
        return group_size(self.expert)

    @property
    def expert_rank(self) -> int:
        return group_rank(self.expert)

    @property
    def sequence_rng(self) -> TensorParallelRNG | None:
        """The tracker for dropout on sequence shards (they differ per rank); None when the
        activations are replicated on the tensor ranks and the default generator must be used."""
        return self.rng if self.sequence_parallel else None
