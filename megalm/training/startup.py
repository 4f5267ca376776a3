"""Start-up: the one path from a config to a DeepSpeed engine on this rank.

    launcher env -> process group -> cfg.validate(world) -> ParallelDims -> ProcessGroups
      -> DeepSpeed runtime -> seed -> data (when asked) -> model (-> `prepare_model`) -> engine

The data comes before the model so that a bad shard path or tokenizer fails in seconds, not after
a large model has been initialised.

Training, the benchmark, the checkpoint writer and the memory probe all start here, so a new
parallel dimension is added once: in ParallelDims.from_config, ProcessGroups and this function.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megalm.config import Config
from megalm.parallel.context import TensorParallel
from megalm.parallel.dims import ParallelDims
from megalm.parallel.groups import ProcessGroups, build_process_groups, init_distributed
from megalm.parallel.launch_env import LaunchEnv
from megalm.training.data import TrainData
from megalm.training.engine import Engine, build_engine, build_model, device_type, init_deepspeed_runtime


@dataclass
class Runtime:
    """What start-up built: the validated config, the launch, this rank's groups, the training
    data (None unless asked for), the engine and the device it computes on."""

    cfg: Config
    launch: LaunchEnv
    groups: ProcessGroups
    data: TrainData | None
    engine: Engine
    device: torch.device

    @property
    def dims(self) -> ParallelDims:
        return self.groups.dims


def bootstrap(
    cfg: Config, *, data: bool = False, prepare_model: Callable[[nn.Module, ProcessGroups], None] | None = None,
    announce: bool = False, resumed: Any = None,
) -> Runtime:
    """Collective: start this rank and build its engine. `cfg` is validated in place against the
    launched world size. `data`: also open the training data (tokenizer, shards, sample indices).
    `prepare_model(model, groups)` runs before DeepSpeed takes the model (the checkpoint writer
    copies converted weights in there). `announce` prints the rank's coordinates. `resumed`: the
    CheckpointMeta training resumes from (the data continues its mixture, megalm.data.mixture)."""
    launch = init_distributed(timeout_minutes=cfg.parallel.init_timeout_minutes,
                              collective_timeout_minutes=cfg.parallel.collective_timeout_minutes)
    cfg.validate(launch.world_size)
    groups = build_process_groups(ParallelDims.from_config(cfg.parallel, launch.world_size))
    device = torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
    if announce:
        c = groups.dims.coords(launch.rank)
        context = f" context {c.context}" if groups.dims.context > 1 else ""
        context += f" expert {groups.expert_rank}" if groups.dims.expert > 1 else ""
        print(f"megalm rank {launch.rank}/{launch.world_size} local {launch.local_rank} via {launch.launcher} "
              f"on {os.environ.get('SLURMD_NODENAME') or socket.gethostname()}: pipeline {c.pipeline} data {c.data}"
              f"{context} tensor {c.tensor} ({device}, {torch.distributed.get_backend()})", flush=True)
    init_deepspeed_runtime(cfg.parallel.collective_timeout_minutes)
    torch.manual_seed(cfg.train.seed)  # equal on every rank: replicated dropout agrees across tensor ranks
    train_data = TrainData.build(cfg, groups, resumed) if data else None
    tp = TensorParallel.from_groups(groups, sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed)
    model = build_model(cfg, tp, groups.dims)
    if prepare_model is not None:
        prepare_model(model, groups)
    engine = build_engine(cfg, groups, model, tp)
    return Runtime(cfg, launch, groups, train_data, engine, device)
