"""TensorParallel: the one object every model constructor takes for the tensor axis.

It replaces four arguments that used to travel together through every constructor (the tensor
group, the sequence-parallel flag, the seed and the dropout RNG tracker) and normalises them once:
a group of one rank is no tensor parallelism (`group` None) and sequence parallelism only exists
with more than one tensor rank.

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
    """

    group: dist.ProcessGroup | None
    sequence_parallel: bool
    seed: int
    rng: TensorParallelRNG

    @classmethod
    def build(
        cls, group: dist.ProcessGroup | None = None, *, sequence_parallel: bool = False, seed: int = 1234
    ) -> TensorParallel:
        """The context of `group` (None, or a group of one rank: no tensor parallelism)."""
        if group_size(group) == 1:
            group = None
        return cls(group, sequence_parallel and group is not None, seed, TensorParallelRNG(seed, group_rank(group)))

    @classmethod
    def from_groups(cls, groups: ProcessGroups, *, sequence_parallel: bool, seed: int) -> TensorParallel:
        """The context of this rank's tensor group in the run's mesh."""
        return cls.build(groups.tensor, sequence_parallel=sequence_parallel, seed=seed)

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    @property
    def sequence_rng(self) -> TensorParallelRNG | None:
        """The tracker for dropout on sequence shards (they differ per rank); None when the
        activations are replicated on the tensor ranks and the default generator must be used."""
        return self.rng if self.sequence_parallel else None
