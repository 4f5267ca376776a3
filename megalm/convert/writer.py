"""Write a full (tensor size 1) GPT state dict as a megalm checkpoint at any tensor/pipeline size.

The route is the trainer's own: T x P x D gloo ranks each build their model (or pipeline stage)
with megalm.training.engine.build_model, copy in their shard of the weights (sliced with each
parameter's own partition_dim/partition_stride, the vocabulary padded to this tensor size), build
the real DeepSpeed engine with build_engine and save with megalm.training.checkpoint's
save_checkpoint. So the files, megalm.json and `latest` are exactly what `python -m megalm.train`
writes and resumes from. The optimizer is fresh (Adam moments zero); the step and the learning-rate
schedule continue from `step`.

Under bf16, DeepSpeed derives its fp32 master weights from the bf16 module; they are then set to the
exact fp32 values (deepspeed.utils.safe_set_full_fp32_param), so nothing is lost in a round trip.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from megalm.config import Config
from megalm.errors import MegalmError

WEIGHTS_FILE = "weights.safetensors"


def write_checkpoint(
    cfg: Config, state: dict[str, torch.Tensor], run_dir: Path, *, step: int = 0, consumed_samples: int = 0,
    tokenizer_info: dict[str, Any] | None = None, tokenizer_files: list[str] = (), data_parallel: int = 1,
    timeout: float = 3600.0,
) -> Path:
    """Write RUN_DIR/config.yaml and RUN_DIR/checkpoints/{global_step<step>, latest}; return the tag dir.

    `cfg` is validated for tensor x pipeline x data_parallel ranks; `state` holds every GPT parameter
    with the tokenizer's vocabulary rows (no padding)."""
    from safetensors.torch import save_file

    from megalm.testing.distributed import run_distributed_test

    world = cfg.parallel.tensor * cfg.parallel.pipeline * data_parallel
    cfg.validate(world)
    if (run_dir / "checkpoints").exists():
        raise MegalmError(f"{run_dir}/checkpoints already exists; choose a new output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megalm-convert-", dir=run_dir) as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        args = (cfg.to_yaml(), str(weights), str(run_dir / "checkpoints"), step, consumed_samples,
                tokenizer_info or {}, list(tokenizer_files))
        run_distributed_test(_write_rank, world, args=args, timeout=timeout,
                             env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    raw = cfg.to_dict()
    raw["train"]["grad_accum_steps"] = None  # derived again on resume: train.global_batch_size may change
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return run_dir / "checkpoints" / f"global_step{step}"


def _write_rank(
    cfg_yaml: str, weights: str, root: str, step: int, consumed: int, tokenizer_info: dict, tokenizer_files: list[str],
) -> None:
    import torch.distributed as dist

    from megalm.config import config_from_dict
    from megalm.parallel.dims import ParallelDims
    from megalm.parallel.groups import build_process_groups
    from megalm.training.checkpoint import TrainState, save_checkpoint
    from megalm.training.engine import build_engine, build_model, init_deepspeed_runtime

    cfg = config_from_dict(yaml.safe_load(cfg_yaml)).validate(dist.get_world_size())
    p = cfg.parallel
    dims = ParallelDims.from_world(dist.get_world_size(), tensor=p.tensor, pipeline=p.pipeline)
    groups = build_process_groups(dims)
    init_deepspeed_runtime(p.init_timeout_minutes)
    model = build_model(cfg, groups)
    shards = _load_shards(model, weights, cfg, groups.tensor_rank, dims.tensor)
    engine = build_engine(cfg, groups, model=model)
    _set_fp32_masters(engine.ds, shards)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore")
        for _ in range(step):
            engine.ds.lr_scheduler.step()
    engine.ds.global_steps, engine.ds.global_samples = step, consumed
    metadata = {
        "megalm_version": _version(), "config_yaml": cfg.to_yaml(),
        "parallel": {"tensor": dims.tensor, "pipeline": dims.pipeline, "data": dims.data},
        "world_size": dims.world_size, "tokenizer": tokenizer_info,
    }
    save_checkpoint(engine.ds, Path(root), TrainState(step, consumed), metadata, tokenizer_files, keep_last=0)


def _load_shards(model: torch.nn.Module, weights: str, cfg: Config, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Copy this rank's shard of every parameter into `model`; return them (name -> fp32 shard)."""
    from safetensors import safe_open

    from megalm.convert.reader import VOCAB_PARAMS, gpt_name
    from megalm.parallel.layers import shard_tensor

    shards = {}
    with safe_open(weights, framework="pt") as f, torch.no_grad():
        for name, param in model.named_parameters():
            full = f.get_tensor(gpt_name(name, cfg.model.num_layers))
            if gpt_name(name, cfg.model.num_layers) in VOCAB_PARAMS:
                rows = param.size(0) * (tp if param.tensor_model_parallel else 1)
                full = torch.cat([full, full.new_zeros(rows - full.size(0), *full.shape[1:])])
            if param.tensor_model_parallel:
                full = shard_tensor(full, param.partition_dim, tp_rank, tp, param.partition_stride)
            if full.shape != param.shape:
                raise MegalmError(f"{name}: converted shape {tuple(full.shape)} != model shape {tuple(param.shape)}")
            param.copy_(full)
            shards[name] = full
    return shards


def _set_fp32_masters(ds: Any, shards: dict[str, torch.Tensor]) -> None:
    """Make the optimizer's fp32 masters the exact fp32 values (the module may be bf16)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in ds.module.named_parameters():
        if param.dtype != torch.float32 or hasattr(param, "ds_id"):
            safe_set_full_fp32_param(param, shards[name].to(param.device))


def copy_tokenizer_file(src: str, run_dir: Path) -> str:
    """Copy a tokenizer file into RUN_DIR/tokenizer/ so the written config.yaml stays valid."""
    dst = run_dir / "tokenizer" / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() != dst.resolve():
        shutil.copy2(src, dst)
    return str(dst)


def _version() -> str:
    from megalm import __version__

    return __version__


def describe_written(ckpt: Path) -> str:
    meta = json.loads((ckpt / "megalm.json").read_text())
    p = meta["parallel"]
    return f"{ckpt} (tensor {p['tensor']}, pipeline {p['pipeline']}, data {p['data']}, step {meta['step']})"
