"""ParallelDims: the degrees of the pipeline x data x context x tensor mesh and a rank's coordinates.

Rank layout (Megatron's order; DeepSpeed's PipeModelDataParallelTopology(num_pp, num_mp, num_dp)
when context = 1): tensor ranks are adjacent (innermost axis), then context, then data, then
pipeline (outermost):

    rank = ((pipeline_rank * data + data_rank) * context + context_rank) * tensor + tensor_rank

Context ranks hold the same parameters and different chunks of every sequence, so for the
optimizer they are data ranks: gradients are summed over context and averaged over data, and ZeRO
partitions over data x context (DeepSpeed's "sequence data parallel" group).

Expert parallelism folds into data x context (Megatron's folding; torchtitan's
dp_shard x cp = efsdp x ep): the data x context ranks of a (pipeline, tensor) position, in data x
context order, split into groups of `expert` consecutive ranks that hold different experts (the
expert group, all-to-all of tokens) and the ranks holding the same experts, one per expert group
(the expert-data group: expert gradients are reduced and ZeRO partitions expert states over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from megalm.errors import MegalmError

if TYPE_CHECKING:  # the config validates itself with ParallelDims
    from megalm.config import ParallelConfig


class Coords(NamedTuple):
    """A rank's position on each axis of the mesh."""

    pipeline: int
    data: int
    context: int
    tensor: int


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the four parallel axes; world_size = tensor * context * pipeline * data."""

    tensor: int
    pipeline: int
    data: int
    context: int = 1
    expert: int = 1
    """Expert parallelism: ranks of data x context that split each MoE layer's experts."""

    def __post_init__(self) -> None:
        for axis in ("tensor", "pipeline", "data", "context", "expert"):
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise MegalmError(f"parallel {axis} size must be a positive integer, got {value!r}")
        if self.zero_shards % self.expert:
            raise MegalmError(
                f"parallel.expert ({self.expert}) must divide data x context ({self.data} x {self.context} = "
                f"{self.zero_shards}): expert-parallel ranks are carved from the data and context ranks")

    @classmethod
    def from_world(cls, world_size: int, *, tensor: int = 1, pipeline: int = 1, context: int = 1,
                   expert: int = 1) -> ParallelDims:
        """Derive data = world_size / (tensor * context * pipeline); the message shows the product when it fails."""
        if tensor < 1 or pipeline < 1 or context < 1:
            raise MegalmError(f"parallel sizes must be positive: tensor={tensor} context={context} pipeline={pipeline}")
        model = tensor * pipeline * context
        if world_size % model != 0:
            names, sizes = ("tensor x pipeline", f"{tensor} x {pipeline}") if context == 1 else (
                "tensor x context x pipeline", f"{tensor} x {context} x {pipeline}")
            raise MegalmError(
                f"world size {world_size} is not divisible by {names} = {sizes} = {model}; launch a multiple of "
                f"{model} processes or change parallel.{names.replace(' x ', '/')}"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=world_size // model, context=context, expert=expert)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The mesh of a run's `parallel` section on `world_size` ranks: the one place a parallel
        degree named in the config becomes a mesh axis."""
        return cls.from_world(world_size, tensor=cfg.tensor, pipeline=cfg.pipeline, context=cfg.context,
                              expert=cfg.expert)

    @property
    def world_size(self) -> int:
        return self.tensor * self.context * self.pipeline * self.data

    @property
    def zero_shards(self) -> int:
        """Ranks that hold the same parameters and share one optimizer partitioning (data x context)."""
        return self.data * self.context

    def coords(self, rank: int) -> Coords:
        """(pipeline, data, context, tensor) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tensor, rest = rank % self.tensor, rank // self.tensor
        context, rest = rest % self.context, rest // self.context
        return Coords(pipeline=rest // self.data, data=rest % self.data, context=context, tensor=tensor)

    def expert_rank(self, rank: int) -> int:
        """Rank inside the expert group: which slice of each MoE layer's experts `rank` holds."""
        c = self.coords(rank)
        return (c.data * self.context + c.context) % self.expert

    def expert_data_rank(self, rank: int) -> int:
        """Rank inside the expert-data group (0: the rank that writes its experts to a checkpoint)."""
        c = self.coords(rank)
        return (c.data * self.context + c.context) // self.expert

    def rank_of(self, pipeline: int, data: int, context: int, tensor: int) -> int:
        return ((pipeline * self.data + data) * self.context + context) * self.tensor + tensor

    def _groups(self, *, vary: tuple[str, ...]) -> list[list[int]]:
        """The groups of ranks that differ only along the axes `vary` (ranks in mesh order)."""
        sizes = {"pipeline": self.pipeline, "data": self.data, "context": self.context, "tensor": self.tensor}
        fixed = [axis for axis in sizes if axis not in vary]
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)._asdict()
            groups.setdefault(tuple(c[a] for a in fixed), []).append(rank)
        return list(groups.values())

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that share one layer's shards (same stage, data replica and sequence chunk)."""
        return self._groups(vary=("tensor",))

    def context_groups(self) -> list[list[int]]:
        """Ranks that hold the chunks of the same sequences (the all-to-all of context parallelism)."""
        return self._groups(vary=("context",))

    def data_groups(self) -> list[list[int]]:
        """Ranks that read different samples with the same parameters and sequence chunk."""
        return self._groups(vary=("data",))

    def data_context_groups(self) -> list[list[int]]:
        """Ranks that hold the same parameters: gradients are reduced and ZeRO partitions over them."""
        return self._groups(vary=("data", "context"))

    def expert_groups(self) -> list[list[int]]:
        """Ranks that hold different experts of the same layers: `expert` consecutive data x context
        ranks (tokens are exchanged among them)."""
        return [dc[i:i + self.expert] for dc in self.data_context_groups() for i in range(0, len(dc), self.expert)]

    def expert_data_groups(self) -> list[list[int]]:
        """Ranks that hold the same experts, one from each expert group: expert gradients are reduced
        and ZeRO partitions expert states over them."""
        return [dc[i::self.expert] for dc in self.data_context_groups() for i in range(self.expert)]

    def pipeline_groups(self) -> list[list[int]]:
        """Ranks that pass activations stage to stage (same data replica, chunk and tensor rank)."""
        return self._groups(vary=("pipeline",))

    def model_groups(self) -> list[list[int]]:
        """Ranks that together hold one full model replica (tensor x pipeline, same data and context rank)."""
        return self._groups(vary=("pipeline", "tensor"))
