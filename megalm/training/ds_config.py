"""The one place where megalm's typed config becomes DeepSpeed's JSON config."""

from __future__ import annotations

from typing import Any

from megalm.config import Config

# fp16 dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
FP16_LOSS_SCALING = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def deepspeed_zero_stage(cfg: Config, zero_shards: int, pipeline: int) -> int:
    """The ZeRO stage DeepSpeed runs: zero.stage, except 0 where ZeRO 1 or 2 would partition an fp32
    run over a single rank (data x context parallel = 1; not under a pipeline, not with the optimizer
    offloaded). There is nothing to partition, and ZeRO-1/2's flat buffers still copy every gradient
    and weight once more per step (README "Performance"); fp32 has no master copy to keep, so ZeRO-0
    (the torch optimizer on the parameters) is the same arithmetic. Not in bf16/fp16: DeepSpeed's
    ZeRO-0 there steps the 16-bit weights themselves (no fp32 masters; its BF16_Optimizer only serves
    pipelines), a different and worse training. Checkpoints record the stage they were written with
    (CheckpointMeta.zero_stage)."""
    z = cfg.zero
    single = zero_shards == 1 and pipeline == 1 and not z.offload_optimizer and cfg.train.precision == "fp32"
    return 0 if z.stage in (1, 2) and single else z.stage


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed config dict of a validated Config. The optimizer and scheduler are passed to
    deepspeed.initialize as objects (no JIT-compiled ops on CPU), so they do not appear here."""
    t, z = cfg.train, cfg.zero
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "steps_per_print": 1 << 30,  # megalm logs itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW under ZeRO-Offload: no cpu_adam build
        "zero_optimization": {
            "stage": deepspeed_zero_stage(cfg, cfg.data_parallel * cfg.parallel.context, cfg.parallel.pipeline),
            "reduce_bucket_size": z.reduce_bucket_size,
            "allgather_bucket_size": z.reduce_bucket_size,
            "overlap_comm": z.overlap_comm,
            "contiguous_gradients": True,
        },
    }
    if z.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = dict(FP16_LOSS_SCALING)
    if cfg.parallel.pipeline > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": 0, **pipeline_partitioning(cfg.parallel.sequence_parallel)}
    return ds


def pipeline_partitioning(sequence_parallel: bool) -> dict[str, bool]:
    """DeepSpeed's pipeline splits each activation (and gradient) it sends over the tensor ranks and
    the receiving stage all-gathers the pieces (`pipe_partitioned`, `grad_partitioned`, both on by
    default): 1/TP of the bytes cross the stage link, right when every tensor rank holds the same
    tensor. Under sequence parallelism each tensor rank holds its own part of the sequence, which it
    sends whole to the same tensor rank of the next stage; split and gathered, the received
    activation would be pieced together from different ranks' parts (a different model: issue 21)."""
    return {"pipe_partitioned": not sequence_parallel, "grad_partitioned": not sequence_parallel}
