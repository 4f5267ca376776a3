"""Write a full (tensor size 1) GPT state dict as a megalm checkpoint at any tensor/pipeline size.

The route is the trainer's own: T x P x D gloo ranks (megalm.parallel.spawn) start as training does
(megalm.training.startup.bootstrap), copy their shard of the weights into the model before
DeepSpeed takes it (sliced with each parameter's own partition_dim/partition_stride, the vocabulary
padded to this tensor size) and save with megalm.training.checkpoint's save_checkpoint. So the
files, megalm.json and `latest` are exactly what `python -m megalm.train` writes and resumes from. The optimizer is fresh (Adam moments zero); the step and the learning-rate
schedule continue from `step`.

Under bf16, DeepSpeed derives its fp32 master weights from the bf16 module; they are then set to the
exact fp32 values (deepspeed.utils.safe_set_full_fp32_param), so nothing is lost in a round trip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from megalm import seams
from megalm.config import Config, config_from_dict
from megalm.errors import MegalmError
from megalm.model.gpt import VOCAB_PARAMETERS
from megalm.parallel.groups import ProcessGroups
from megalm.parallel.layers import shard_tensor
from megalm.parallel.pipeline import gpt_name
from megalm.parallel.spawn import spawn
from megalm.parallel.vocab import pad_vocab_rows
from megalm.training.checkpoint import save_checkpoint
from megalm.training.checkpoint_meta import CheckpointMeta, TrainState
from megalm.training.startup import bootstrap

WEIGHTS_FILE = "weights.safetensors"


def write_checkpoint(
    cfg: Config, state: dict[str, torch.Tensor], run_dir: Path, *, step: int = 0, consumed_samples: int = 0,
    tokenizer_info: dict[str, Any] | None = None, tokenizer_files: list[str] = (), data_parallel: int = 1,
    timeout: float = 3600.0,
) -> Path:
    """Write RUN_DIR/config.yaml and RUN_DIR/checkpoints/{global_step<step>, latest}; return the tag dir.

    `cfg` is validated for tensor x pipeline x data_parallel ranks; `state` holds every GPT parameter
    with the tokenizer's vocabulary rows (no padding)."""
    from safetensors.torch import save_file  # noqa: PLC0415 - only the converter needs it

    world = cfg.parallel.tensor * cfg.parallel.pipeline * data_parallel
    cfg.validate(world)
    if (run_dir / "checkpoints").exists():
        raise MegalmError(f"{run_dir}/checkpoints already exists; choose a new output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megalm-convert-", dir=run_dir) as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        args = (cfg.to_yaml(), str(weights), str(run_dir / "checkpoints"), TrainState(step, consumed_samples),
                tokenizer_info or {}, list(tokenizer_files))
        spawn(_write_rank, world, args=args, timeout=timeout,
              env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    raw = cfg.to_dict()
    raw["train"]["grad_accum_steps"] = None  # derived again on resume: train.global_batch_size may change
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return run_dir / "checkpoints" / f"global_step{step}"


def _write_rank(
    cfg_yaml: str, weights: str, root: str, state: TrainState, tokenizer_info: dict, tokenizer_files: list[str],
) -> None:
    """One rank of the writer: the trainer's start-up with the converted weights copied in."""
    cfg = config_from_dict(yaml.safe_load(cfg_yaml))
    shards: dict[str, torch.Tensor] = {}

    def load_weights(model: nn.Module, groups: ProcessGroups) -> None:
        shards.update(_load_shards(model, weights, cfg, groups.tensor_rank, groups.dims.tensor))

    rt = bootstrap(cfg, prepare_model=load_weights)
    _set_fp32_masters(rt.engine.ds, shards)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore")
        for _ in range(state.step):
            rt.engine.ds.lr_scheduler.step()
    seams.set_progress(rt.engine.ds, state.step, state.consumed_samples)
    meta = CheckpointMeta.of_run(cfg, rt.dims, state, tokenizer_info)
    save_checkpoint(rt.engine, Path(root), meta, tokenizer_files, keep_last=0)


def _load_shards(model: nn.Module, weights: str, cfg: Config, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Copy this rank's shard of every parameter into `model`; return them (name -> fp32 shard)."""
    from safetensors import safe_open  # noqa: PLC0415 - only the converter needs it

    shards = {}
    with safe_open(weights, framework="pt") as f, torch.no_grad():
        for name, param in model.named_parameters():
            full = f.get_tensor(gpt_name(name, cfg.model.num_layers))
            if gpt_name(name, cfg.model.num_layers) in VOCAB_PARAMETERS:
                full = pad_vocab_rows(full, param.size(0) * (tp if param.tensor_model_parallel else 1))
            if param.tensor_model_parallel:
                full = shard_tensor(full, param.partition_dim, tp_rank, tp, param.partition_stride)
            if full.shape != param.shape:
                raise MegalmError(f"{name}: converted shape {tuple(full.shape)} != model shape {tuple(param.shape)}")
            param.copy_(full)
            shards[name] = full
    return shards


def _set_fp32_masters(ds: Any, shards: dict[str, torch.Tensor]) -> None:
    """Make the optimizer's fp32 masters the exact fp32 values (the module may be bf16)."""
    from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415 - heavy

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


def describe_written(ckpt: Path) -> str:
    return f"{ckpt} ({CheckpointMeta.read(ckpt).describe()})"
