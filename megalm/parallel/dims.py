"""ParallelDims: the degrees of the pipeline x data x tensor mesh and a rank's coordinates in it.

Rank layout (the same as DeepSpeed's PipeModelDataParallelTopology(num_pp, num_mp, num_dp) and
Megatron): tensor ranks are adjacent (innermost axis), then data, then pipeline (outermost):

    rank = (pipeline_rank * data + data_rank) * tensor + tensor_rank
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megalm.errors import MegalmError

if TYPE_CHECKING:  # the config validates itself with ParallelDims
    from megalm.config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the three parallel axes; world_size = tensor * pipeline * data."""

    tensor: int
    pipeline: int
    data: int

    def __post_init__(self) -> None:
        for axis in ("tensor", "pipeline", "data"):
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise MegalmError(f"parallel {axis} size must be a positive integer, got {value!r}")

    @classmethod
    def from_world(cls, world_size: int, *, tensor: int = 1, pipeline: int = 1) -> ParallelDims:
        """Derive data = world_size / (tensor * pipeline); the message shows the product when it fails."""
        if tensor < 1 or pipeline < 1:
            raise MegalmError(f"parallel sizes must be positive: tensor={tensor} pipeline={pipeline}")
        model = tensor * pipeline
        if world_size % model != 0:
            raise MegalmError(
                f"world size {world_size} is not divisible by tensor x pipeline = {tensor} x {pipeline}"
                f" = {model}; launch a multiple of {model} processes or change parallel.tensor/pipeline"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=world_size // model)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The mesh of a run's `parallel` section on `world_size` ranks: the one place a parallel
        degree named in the config becomes a mesh axis."""
        return cls.from_world(world_size, tensor=cfg.tensor, pipeline=cfg.pipeline)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipeline_rank, data_rank, tensor_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank // (self.data * self.tensor), (rank // self.tensor) % self.data, rank % self.tensor

    def rank_of(self, pipeline: int, data: int, tensor: int) -> int:
        return (pipeline * self.data + data) * self.tensor + tensor

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that share one layer's shards (same pipeline stage and data replica)."""
        return [
            [self.rank_of(p, d, t) for t in range(self.tensor)]
            for p in range(self.pipeline)
            for d in range(self.data)
        ]

    def data_groups(self) -> list[list[int]]:
        """Ranks that hold the same parameters and average gradients (same stage and tensor rank)."""
        return [
            [self.rank_of(p, d, t) for d in range(self.data)]
            for p in range(self.pipeline)
            for t in range(self.tensor)
        ]

    def pipeline_groups(self) -> list[list[int]]:
        """Ranks that pass activations stage to stage (same data replica and tensor rank)."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pipeline)]
            for d in range(self.data)
            for t in range(self.tensor)
        ]

    def model_groups(self) -> list[list[int]]:
        """Ranks that together hold one full model replica (tensor x pipeline, same data rank)."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pipeline) for t in range(self.tensor)]
            for d in range(self.data)
        ]
