"""Universal checkpoints: every parameter's full fp32 master and Adam moments, so a run resumes at any
tensor / pipeline / data-parallel size and ZeRO stage with its optimizer.

    python tools/convert_checkpoint.py universal --checkpoint RUN_DIR --output U
    python -m megalm.train --config ... checkpoint.load=U parallel.tensor=... zero.stage=...

Layout (DeepSpeed's universal checkpoint layout and file format, megalm's GPT parameter names):

    U/latest                          -> global_stepN
    U/global_stepN/
      megalm.json                     CheckpointMeta, kind "universal" (the source's layout and position)
      config.yaml, tokenizer/         as in every megalm checkpoint
      zero/<name>/fp32.pt             {"param": tensor}: the full fp32 master, tensor size 1, the
              exp_avg.pt, exp_avg_sq.pt  tokenizer's vocabulary rows (no padding); Adam's moments, or
              momentum_buffer.pt         Muon's momentum for its matrices (optimizer.name=muon); absent
              step.pt                    when the source had no optimizer state (from-hf); step: Adam's count
      buffers/<name>.pt               {"param": tensor}: persistent buffers (the MoE expert bias), megalm's
                                      addition (DeepSpeed's own loader knows parameters only)

Writing reads the source with megalm's checkpoint reader, one parameter at a time (any layout: ZeRO
0-3, fp32 or bf16, pipeline or not; a ZeRO-0 pipeline excepted), so memory holds about two copies
of the largest parameter, not the model. Loading is
DeepSpeed's: the weights go into the model before deepspeed.initialize, then each rank's masters and
moments are set through DeepSpeed's safe_set_full_* API, which partitions them for ZeRO; only the
slicing of a full tensor into this rank's tensor-parallel shard (and, for routed experts, its expert
rank's experts) is megalm's (`local_shard`). The
optimizer's parameter groups, learning rate and weight decay come from the resuming run's config,
matched by name, never from the source's group list by position.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from megalm import seams
from megalm.config import Config
from megalm.convert.reader import (
    UNIVERSAL_PARAM,
    CheckpointReader,
    open_checkpoint,
    universal_buffer_file,
    universal_state_file,
)
from megalm.errors import MegalmError
from megalm.model.gpt import VOCAB_PARAMETERS
from megalm.model.moe import is_expert_parallel
from megalm.parallel.groups import ProcessGroups
from megalm.parallel.layers import shard_tensor
from megalm.parallel.pipeline import gpt_name
from megalm.parallel.sharding import buffer_names, sharding_specs
from megalm.parallel.vocab import pad_vocab_rows
from megalm.training import manifest
from megalm.training.checkpoint import atomic_write_text, fsync_tree, tag_of, write_metadata
from megalm.training.checkpoint_meta import CheckpointMeta, TrainState
from megalm.training.engine import Engine

# ----------------------------------------------------------------------------- writing


def convert_to_universal(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the universal form of a megalm checkpoint (any layout) into `output`, one parameter at a
    time (memory: about twice the largest parameter); return its tag dir."""
    src = open_checkpoint(checkpoint, optimizer=True)
    if src.meta.kind == "universal":
        raise MegalmError(f"{src.path} is already a universal checkpoint")
    if src.pipeline > 1 and src.config.zero.stage == 0:
        raise MegalmError(f"{src.path}: a ZeRO-0 pipeline checkpoint keeps its optimizer state in a form megalm "
                          "does not convert; resume it at the same layout and save it with zero.stage=1")
    reader = CheckpointReader(src)
    states = ((name, {key: functools.partial(reader.full, name, key) for key in reader.keys(name)})
              for name in reader.specs)
    return write_universal(output, src.meta, states, reader.step(), src.tokenizer().files(), reader.buffers())


def write_universal(
    output: str | Path, meta: CheckpointMeta,
    states: Iterator[tuple[str, dict[str, torch.Tensor | Callable[[], torch.Tensor]]]], step: float,
    tokenizer_files: list[str], buffers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `states` (GPT name -> {"fp32", and optionally its optimizer's OPTIMIZER_KEYS}: a tensor, or a
    function reading it, called when its file is written, so memory holds one at a time) as a
    universal checkpoint at meta's step into `output` (a new directory); written as
    OUTPUT.partial, renamed last."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise MegalmError(f"output directory {out} exists and is not empty; choose a new one")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / tag_of(meta.state.step)
    try:
        for name, values in states:
            universal_state_file(ckpt, name, "fp32").parent.mkdir(parents=True)
            for key, value in values.items():
                tensor = value() if callable(value) else value
                torch.save({UNIVERSAL_PARAM: tensor.contiguous()}, universal_state_file(ckpt, name, key))
                del tensor
            torch.save({UNIVERSAL_PARAM: torch.tensor(step)}, universal_state_file(ckpt, name, "step"))
        for name, tensor in (buffers or {}).items():
            universal_buffer_file(ckpt, name).parent.mkdir(parents=True, exist_ok=True)
            torch.save({UNIVERSAL_PARAM: tensor.contiguous()}, universal_buffer_file(ckpt, name))
        write_metadata(ckpt, replace(meta, kind="universal"), tokenizer_files)
        fsync_tree(ckpt)
        manifest.record(ckpt)
        atomic_write_text(tmp / "latest", ckpt.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left looking like a checkpoint
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out / ckpt.name


# ----------------------------------------------------------------------------- loading


def local_shard(full: torch.Tensor, name: str, param: nn.Parameter, tp_rank: int, tp: int,
                expert_rank: int = 0, experts: int = 1) -> torch.Tensor:
    """This rank's tensor-parallel shard of the full (unpadded) tensor of GPT parameter `name`, shaped
    as `param` (the vocabulary padded to this layout's size, split along partition_dim/stride; a
    routed expert weight first cut to expert rank `expert_rank`'s experts of `experts`)."""
    shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the shard's shape aside
    if is_expert_parallel(param):
        full = shard_tensor(full, 0, expert_rank, experts)
    if name in VOCAB_PARAMETERS:
        full = pad_vocab_rows(full, shape[0] * (tp if param.tensor_model_parallel else 1))
    if param.tensor_model_parallel and tp > 1:
        full = shard_tensor(full, param.partition_dim, tp_rank, tp, param.partition_stride)
    if tuple(full.shape) != shape:
        raise MegalmError(f"{name}: the universal checkpoint's tensor {tuple(full.shape)} does not fit this "
                          f"model's {shape}: the checkpoint is of another model shape")
    return full


class UniversalCheckpoint:
    """A universal checkpoint directory (global_stepN), read one tensor at a time (memory-mapped)."""

    def __init__(self, ckpt: Path, meta: CheckpointMeta) -> None:
        self.path, self.meta = ckpt, meta

    @classmethod
    def open(cls, ckpt: Path) -> UniversalCheckpoint:
        meta = CheckpointMeta.read(ckpt)
        if meta.kind != "universal":
            raise MegalmError(f"{ckpt} is not a universal checkpoint (convert it with convert_checkpoint.py universal)")
        return cls(ckpt, meta)

    def has(self, name: str, key: str) -> bool:
        return universal_state_file(self.path, name, key).is_file()

    def tensor(self, name: str, key: str) -> torch.Tensor:
        path = universal_state_file(self.path, name, key)
        if not path.is_file():
            raise MegalmError(f"{path} is missing: the universal checkpoint is incomplete")
        return seams.load_deepspeed_file(path)[UNIVERSAL_PARAM]

    def check_model(self, cfg: Config) -> None:
        """One line when the resuming model is not the checkpoint's (shape, vocabulary, architecture)
        or a state file is missing: before anything is built or written."""
        saved, now = self.meta.config.model, cfg.model
        for key in ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                    "vocab_size", "tie_embeddings", "max_seq_len"):
            if getattr(saved, key) != getattr(now, key):
                raise MegalmError(f"the universal checkpoint {self.path} is of another model: model.{key} is "
                                  f"{getattr(saved, key)} there and {getattr(now, key)} here")
        names = list(sharding_specs(now))
        missing = [n for n in buffer_names(now) if not universal_buffer_file(self.path, n).is_file()]
        if missing:
            raise MegalmError(f"{universal_buffer_file(self.path, missing[0])} is missing: the universal checkpoint "
                              "does not carry the model's buffers (converted by a megalm that did not keep them)")
        moments = self.has_optimizer_state()
        for name in names:
            adam = not self.has(name, "momentum_buffer")  # a Muon matrix keeps its momentum, the rest Adam's moments
            for key in ["fp32", "step", *((["exp_avg", "exp_avg_sq"] if adam else ["momentum_buffer"]) if moments else [])]:
                if not self.has(name, key):
                    raise MegalmError(f"{universal_state_file(self.path, name, key)} is missing: the universal "
                                      "checkpoint is incomplete")
        if moments and not cfg.checkpoint.reset_optimizer:
            self.meta.check_optimizer(cfg)

    def has_optimizer_state(self) -> bool:
        """Whether the source had optimizer state (the first parameter, the embedding, is Adam's in any run)."""
        return self.has(next(iter(sharding_specs(self.meta.config.model))), "exp_avg")

    def weight_loader(self, cfg: Config) -> Callable[[nn.Module, ProcessGroups], None]:
        """bootstrap's prepare_model: copy each parameter's fp32 master (rounded to the model's dtype)
        into the model before deepspeed.initialize makes the optimizer's masters from it."""

        def load(model: nn.Module, groups: ProcessGroups) -> None:
            buffers = set(buffer_names(cfg.model))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    gpt = gpt_name(name, cfg.model.num_layers)
                    shard = local_shard(self.tensor(gpt, "fp32"), gpt, param, groups.tensor_rank, groups.dims.tensor,
                                        groups.expert_rank, groups.dims.expert)
                    param.copy_(shard)
                for name, buf in model.named_buffers():
                    gpt = gpt_name(name, cfg.model.num_layers)
                    if gpt in buffers:
                        buf.copy_(seams.load_deepspeed_file(universal_buffer_file(self.path, gpt))[UNIVERSAL_PARAM])

        return load

    def load_optimizer(self, engine: Engine, cfg: Config, moments: bool = True) -> TrainState:
        """Collective, after weight_loader and deepspeed.initialize: set every master exactly, its
        optimizer's states (Adam's moments and step, Muon's momentum; unless `moments` is False: a
        fresh optimizer; check_model has checked they are this run's optimizer's), the learning-rate
        schedule and DeepSpeed's step counters; reseed the random streams for the step (the source's
        per-rank states belong to its own layout). Return where training stands."""
        tp_rank, tp, layers = engine.tp.rank, engine.tp.size, cfg.model.num_layers
        expert_rank, experts = engine.tp.expert_rank, engine.tp.expert_size
        params = list(engine.ds.module.named_parameters())
        step = float(self.tensor(gpt_name(params[0][0], layers), "step")) if moments and params else 0.0
        seams.prepare_optimizer_state(engine.ds, step)
        for name, param in params:
            gpt = gpt_name(name, layers)
            keys = [k for k in seams.OPTIMIZER_KEYS if k == "fp32" or (moments and self.has(gpt, k))]
            seams.set_full_state(engine.ds, param, {k: local_shard(self.tensor(gpt, k), gpt, param, tp_rank, tp,
                                                                   expert_rank, experts) for k in keys})
        state = self.meta.state
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore")
            for _ in range(state.step):
                engine.ds.lr_scheduler.step()
        seams.set_progress(engine.ds, state.step, state.consumed_samples)
        torch.manual_seed(cfg.train.seed + state.step)  # as Megatron does on a layout change
        engine.tp.rng.reseed(cfg.train.seed + state.step)
        return state
