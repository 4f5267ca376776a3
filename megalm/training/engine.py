"""Build the DeepSpeed engine: runtime set-up, model (plain or pipeline), optimizer, schedule.

Nothing is JIT-compiled: the optimizer is torch's fused AdamW passed as an object (DeepSpeed would
otherwise build FusedAdam / cpu_adam with a compiler), and on CPU the shared-memory all-reduce op
is switched off. The touches below DeepSpeed's public API are in megalm.seams.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megalm import seams
from megalm.config import Config
from megalm.errors import MegalmError
from megalm.model.gpt import GPT
from megalm.model.moe import MoE, expert_group_name, set_aux_loss_scale, set_batch_group
from megalm.parallel.context import TensorParallel
from megalm.parallel.dims import ParallelDims
from megalm.parallel.groups import DeepSpeedMPU, ProcessGroups
from megalm.parallel.pipeline import build_pipeline_module
from megalm.parallel.sharding import universal_checkpoint_info
from megalm.training.ds_config import deepspeed_config, deepspeed_zero_stage
from megalm.training.optimizer import build_optimizer
from megalm.training.schedule import build_scheduler


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_deepspeed_runtime(timeout_minutes: float) -> None:
    """Hand our already-initialised torch.distributed group to deepspeed.comm (no MPI discovery)."""
    import deepspeed  # noqa: PLC0415 - heavy
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - heavy

    if get_accelerator().device_name() == "cpu":  # a CPU op: CUDA's table has none (and probing it runs nvcc)
        seams.skip_op_build("deepspeed_shm_comm")  # an inference all-reduce; its build costs ~90 s on CPU
    deepspeed.init_distributed(
        dist_backend=torch.distributed.get_backend(),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


@dataclass
class Engine:
    """The DeepSpeed engine with what the loop and the checkpoints need beside it."""

    ds: Any  # deepspeed.DeepSpeedEngine or deepspeed.pipe.PipelineEngine (the model is ds.module)
    pipeline: bool
    tp: TensorParallel  # the model's tensor-parallel context (its dropout tracker is checkpointed)
    dims: ParallelDims


def build_model(cfg: Config, tp: TensorParallel, dims: ParallelDims) -> nn.Module:
    """The model this rank holds: the whole GPT, or its pipeline stage as a PipelineModule. Its
    `universal_checkpoint_info` goes into every checkpoint DeepSpeed saves (for ds_to_universal)."""
    model = build_pipeline_module(cfg, tp, dims) if cfg.parallel.pipeline > 1 else GPT(cfg.model, tp)
    model.universal_checkpoint_info = universal_checkpoint_info(cfg.model, dims.tensor)
    set_aux_loss_scale(model, 1.0 / cfg.train.grad_accum_steps)  # DeepSpeed's backward scales the loss so
    return model


def build_engine(cfg: Config, groups: ProcessGroups, model: nn.Module, tp: TensorParallel) -> Engine:
    """DeepSpeed's engine around `model` (build_model's, already holding any weights that must be in
    place before deepspeed.initialize copies them into the optimizer's fp32 masters)."""
    import deepspeed  # noqa: PLC0415 - heavy

    if cfg.train.precision == "fp16" and device_type() != "cuda":
        raise MegalmError("train.precision=fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no "
                          "fp16); use bf16 or fp32 on CPU")
    # ZeRO-0 bf16/fp16: DeepSpeed's mixed-precision wrapper skips a step with a non-finite gradient norm
    stage = deepspeed_zero_stage(cfg, groups.dims.zero_shards, groups.dims.pipeline)
    ds_checks = stage == 0 and cfg.train.precision != "fp32"
    optimizer = build_optimizer(model, cfg.optimizer, guard=not ds_checks, model_cfg=cfg.model, tensor_group=tp.group)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optimizer, cfg.train.steps)
    pipeline = cfg.parallel.pipeline > 1
    ds_config, mpu = deepspeed_config(cfg), None if pipeline else DeepSpeedMPU(groups)  # a PipelineModule brings its own grid
    if cfg.zero.stage == 3 and groups.dims.context > 1:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        seams.partition_zero3_over(model, groups.data_context, ds_config, mpu, dtype)
    set_batch_group(model, groups.data)  # model.moe_aux_loss_statistics=global_batch counts its micro batches
    experts = contextlib.nullcontext()
    if groups.dims.expert > 1:  # DeepSpeed reduces and partitions the experts over their own groups
        seams.register_expert_groups(expert_group_name(groups.dims.expert), groups.expert, groups.expert_data)
        experts = seams.deepspeed_sees_experts(MoE)
    with experts:
        ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu, dist_init_required=False,
        )
    seams.record_fp32_grad_norm(ds)
    if hasattr(optimizer, "bind_flat_groups"):  # Muon under ZeRO 1/2 steps flat partitions
        optimizer.bind_flat_groups(seams.zero_flat_groups(ds))
    if cfg.zero.stage == 3 and groups.dims.context > 1:
        seams.sum_zero3_gradients_over_context(ds, groups.dims.context)
    if not pipeline and stage == 0 and groups.dims.zero_shards == 1:
        seams.skip_gradient_allreduce(ds)
    if cfg.train.compile:
        ds.compile()  # lazy: the first forward compiles the whole model into one graph
    return Engine(ds=ds, pipeline=pipeline, tp=tp, dims=groups.dims)
