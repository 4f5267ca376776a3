"""Process groups for the pipeline x data x context x tensor mesh, built once and passed explicitly.

There is no module-level group state: `ProcessGroups` is created by `build_process_groups` and
handed to every layer that communicates. `DeepSpeedMPU` adapts it to the `mpu` interface that
deepspeed.initialize uses for ZeRO partitioning, gradient-norm reduction and checkpoint names.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm import seams
from megalm.errors import MegalmError
from megalm.parallel.dims import ParallelDims
from megalm.parallel.launch_env import LaunchEnv, discover


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's coordinates and the groups it belongs to on each axis."""

    dims: ParallelDims
    rank: int
    tensor: dist.ProcessGroup
    data: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    model: dist.ProcessGroup
    """tensor x pipeline: the ranks that hold one model replica (Megatron's model-parallel group)."""
    context: dist.ProcessGroup
    """The ranks that hold the chunks of the same sequences."""
    data_context: dist.ProcessGroup
    """data x context: the ranks with the same parameters (gradient reduction, ZeRO partitions)."""
    expert: dist.ProcessGroup | None = None
    """The ranks holding different experts of the same MoE layers (None: parallel.expert = 1)."""
    expert_data: dist.ProcessGroup | None = None
    """The ranks holding the same experts (None: parallel.expert = 1, where it is data x context)."""

    @property
    def tensor_rank(self) -> int:
        return self.dims.coords(self.rank).tensor

    @property
    def context_rank(self) -> int:
        return self.dims.coords(self.rank).context

    @property
    def data_rank(self) -> int:
        return self.dims.coords(self.rank).data

    @property
    def data_context_rank(self) -> int:
        """Rank inside the data x context group (context-major within a data replica)."""
        return self.data_rank * self.dims.context + self.context_rank

    @property
    def expert_rank(self) -> int:
        return self.dims.expert_rank(self.rank)

    @property
    def pipeline_rank(self) -> int:
        return self.dims.coords(self.rank).pipeline

    @property
    def model_rank(self) -> int:
        """Rank inside the model-parallel group (tensor-major within a stage)."""
        return self.pipeline_rank * self.dims.tensor + self.tensor_rank


def backend_for_device() -> str:
    """nccl when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def communication_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor sent through `group` must live: this rank's GPU for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    launch: LaunchEnv | None = None,
    backend: str | None = None,
    timeout_minutes: float = 10.0,
    collective_timeout_minutes: float | None = None,
) -> LaunchEnv:
    """Initialise the default process group from the launcher's environment (idempotent).

    A single process with no launcher still gets a world of one, so every code path is the same.
    `timeout_minutes` bounds the wait for rank 0's rendezvous; `collective_timeout_minutes` (default:
    the same) every collective of every group created afterwards, DeepSpeed's included.
    """
    launch = launch or discover()
    launch.export()
    if dist.is_initialized():
        return launch
    backend = backend or backend_for_device()
    if backend == "gloo" and launch.master_addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep single-node traffic on loopback
    if backend == "nccl":
        if launch.local_rank >= torch.cuda.device_count():
            raise MegalmError(
                f"local rank {launch.local_rank} needs a GPU but this node sees {torch.cuda.device_count()};"
                " start at most one process per visible GPU"
            )
        torch.cuda.set_device(launch.local_rank)
    if launch.rank != 0:
        wait_for_rendezvous(launch.master_addr, launch.master_port, timeout_minutes * 60)
    timeout = datetime.timedelta(minutes=collective_timeout_minutes or timeout_minutes)
    seams.default_group_timeout(timeout)  # groups created without a timeout (DeepSpeed's) get this one
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
    )
    return launch


def wait_for_rendezvous(addr: str, port: int, timeout_s: float) -> None:
    """Fail with one clear line, instead of hanging, when rank 0's rendezvous cannot be reached."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise MegalmError(
                    f"cannot reach the rendezvous at {addr}:{port} after {timeout_s:.0f}s ({e}); check that "
                    "rank 0 started, that MASTER_ADDR resolves from this node and the port is open"
                ) from None
            time.sleep(0.5)


def build_process_groups(dims: ParallelDims) -> ProcessGroups:
    """Create every group of the mesh. Collective: every rank calls it, in the same order."""
    world = dist.get_world_size()
    if dims.world_size != world:
        raise ValueError(
            f"parallel dims tensor x context x pipeline x data = {dims.tensor} x {dims.context} x {dims.pipeline}"
            f" x {dims.data}"
            f" = {dims.world_size} do not match the world size {world}"
        )
    rank = dist.get_rank()

    def mine(all_groups: list[list[int]]) -> dist.ProcessGroup:
        found = None
        for ranks in all_groups:  # new_group must be called by all ranks for every group
            group = dist.new_group(ranks)
            if rank in ranks:
                found = group
        assert found is not None, (rank, all_groups)
        return found

    experts = {}
    if dims.expert > 1:
        experts = {"expert": mine(dims.expert_groups()), "expert_data": mine(dims.expert_data_groups())}
    return ProcessGroups(
        dims=dims,
        rank=rank,
        tensor=mine(dims.tensor_groups()),
        data=mine(dims.data_groups()),
        pipeline=mine(dims.pipeline_groups()),
        model=mine(dims.model_groups()),
        context=mine(dims.context_groups()),
        data_context=mine(dims.data_context_groups()),
        **experts,
    )


class DeepSpeedMPU:
    """The `mpu` object deepspeed.initialize expects, backed by ProcessGroups.

    DeepSpeed calls the model-parallel functions to reduce the gradient norm over the ranks that
    hold different shards, to name checkpoint files (mp_rank_XX) and to skip double counting of
    replicated parameters; the data-parallel ones for the batch size. Context parallelism is what
    DeepSpeed calls sequence parallelism (Ulysses): it sums gradients over the sequence group,
    averages them over the data group, and partitions ZeRO state and names the optimizer files
    over the "sequence data parallel" group (data x context), so nothing is reduced twice.
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups

    # model parallel = tensor x pipeline (Megatron's meaning)
    def get_model_parallel_rank(self) -> int:
        return self.groups.model_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.dims.tensor * self.groups.dims.pipeline

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.model

    # tensor model parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tensor_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.dims.tensor

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.tensor

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.groups.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dims.data

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.data

    # context parallel (DeepSpeed's sequence parallel) and data x context
    def get_sequence_parallel_rank(self) -> int:
        return self.groups.context_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.groups.dims.context

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.context

    def get_sequence_data_parallel_rank(self) -> int:
        return self.groups.data_context_rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.groups.dims.zero_shards

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.data_context

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pipeline_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.dims.pipeline

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.groups.pipeline
