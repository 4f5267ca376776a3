"""Checkpoints: DeepSpeed's own layout plus megalm's metadata, with a `latest` written last.

    RUN_DIR/checkpoints/
      latest                       tag of the newest COMPLETE checkpoint
      global_stepN/
        mp_rank_XX_model_states.pt, *_optim_states.pt ...   DeepSpeed's files (zero_to_fp32 works)
        megalm.json                CheckpointMeta (megalm.training.checkpoint_meta): format version,
                                   parallel dims, step, consumed samples, tokenizer, config
        manifest.json              every file above with its size and sha256 (megalm.training.manifest)
        config.yaml                the resolved config
        tokenizer/                 the tokenizer's files
        rng_state_rank{R}.pt       python/numpy/torch/cuda RNG states of each rank, and its
                                   tensor-parallel dropout tracker
        experts_ep{E}_mp_rank_XX.pt  under expert parallelism: expert rank E's experts (and at
                                   ZeRO-0 their fp32 masters and Adam moments; ZeRO 1/2 keep those
                                   in each rank's own optimizer file). DeepSpeed's model file holds
                                   only its writer's experts, so these are loaded over them.

A save is written into global_stepN.saving; when every rank has written and fsync'd its files, rank 0
renames the directory to global_stepN (setting aside a complete checkpoint of the same step, if a run
saves one step twice: resumed, then preempted at once) and only then writes `latest`. So a
global_stepN directory is always complete, and a save that dies half-way never touches the
checkpoint `latest` names. A write that fails on any rank (disk full, permissions) is caught where
DeepSpeed writes, so every rank reaches the end of the save; they then agree that it failed, the
half-written directory is removed and the run stops with one line, `latest` untouched. With
checkpoint.async_save the same files are written by a background thread of each rank
(`start_async_save` / `finish_async_save`, megalm.training.async_save) and published by the same rule.

Before anything loads a checkpoint its manifest is checked (sizes, and digests shared out over the
ranks); a damaged one is named, with the newest intact one, and `checkpoint.fallback` lets
checkpoint.load=auto resume from that one instead (`intact_checkpoint`).

Every file is read with weights_only=True: DeepSpeed's through megalm.seams.checkpoint_reads (its
own engine would unpickle anything, so a planted pickle would run its code on resume; megalm's
allowlist of the types DeepSpeed pickles, memory-mapped), megalm's (RNG states, experts) directly.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalm import seams
from megalm.errors import MegalmError
from megalm.model.moe import is_expert_parallel
from megalm.parallel.groups import communication_device
from megalm.parallel.random import TensorParallelRNG
from megalm.training import manifest
from megalm.training.async_save import BackgroundWriter, queued_save
from megalm.training.checkpoint_meta import METADATA_FILE, CheckpointMeta, TrainState
from megalm.training.engine import Engine

TAG_RE = re.compile(r"^global_step(\d+)$")
SAVING, REPLACED = ".saving", ".replaced"
"""Suffixes of a save in progress and of a same-step checkpoint set aside while a save is published."""


def tag_of(step: int) -> str:
    return f"global_step{step}"


def rng_state(tracker: TensorParallelRNG) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "tensor_parallel": tracker.get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], tracker: TensorParallelRNG) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker.set_states(state["tensor_parallel"])


def save_checkpoint(
    engine: Engine, root: Path, meta: CheckpointMeta, tokenizer_files: list[str], keep_last: int,
) -> Path:
    """Collective: every rank saves its part into global_stepN.saving and fsyncs it; rank 0 writes
    the metadata, publishes the directory as global_stepN and, last, points `latest` at it."""
    tag = tag_of(meta.state.step)
    staging = root / (tag + SAVING)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that died half-way
    dist.barrier()
    with seams.collect_write_errors(engine.ds) as errors:  # a failed write must not strand the others
        _save_deepspeed(engine, root, staging, {"megalm": meta.to_dict()})
        try:
            if not errors:
                _atomic_torch_save(rng_state(engine.tp.rng), staging / f"rng_state_rank{rank}.pt")
                if rank == 0:
                    write_metadata(staging, meta, tokenizer_files)
                fsync_tree(staging)  # what this rank wrote is on disk before `latest` can name it
        except (OSError, RuntimeError) as e:
            errors.append(e)
    _agree_on_save(root, staging, [f"{type(e).__name__}: {e}" for e in errors])
    manifest.record(staging, rank, dist.get_world_size())
    dist.barrier()
    if rank == 0:
        _publish(root, staging, tag)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return root / tag


@dataclass(frozen=True)
class PendingSave:
    """An asynchronous save whose files are still being written (megalm.training.async_save)."""

    root: Path
    staging: Path
    tag: str
    keep_last: int


def start_async_save(
    engine: Engine, root: Path, meta: CheckpointMeta, tokenizer_files: list[str], keep_last: int,
    writer: BackgroundWriter,
) -> PendingSave:
    """Collective: snapshot this rank's part of the checkpoint and queue its files on `writer`;
    returns as soon as the copies are made. `finish_async_save` publishes it."""
    tag = tag_of(meta.state.step)
    staging = root / (tag + SAVING)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    with seams.checkpoint_writes(engine.ds, queued_save(writer)):
        _save_deepspeed(engine, root, staging, {"megalm": meta.to_dict()})
    writer.write(rng_state(engine.tp.rng), staging / f"rng_state_rank{rank}.pt")
    if rank == 0:
        write_metadata(staging, meta, tokenizer_files)  # small: written now, hashed when published
    return PendingSave(root, staging, tag, keep_last)


def reserve_async_save(engine: Engine, root: Path, writer: BackgroundWriter) -> None:
    """Collective, after the first optimizer step (when the optimizer's states exist): a save that
    writes nothing tells each rank the tensors of its checkpoint files; the writer reserves host
    buffers for them and maps their pages in the background, so the first save only copies, as
    every later one does. A rank without the host memory for its copy learns it now, not at the
    first save."""
    staging = root / ("global_step_reserve" + SAVING)  # pruned like any half-written save if killed
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    def reserve(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> None:
        writer.copies.reserve(state_dict, Path(path).name)

    with seams.checkpoint_writes(engine.ds, reserve):
        _save_deepspeed(engine, root, staging, {})
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # the directory DeepSpeed made (and its recovery script)
    writer.touch_copies()


def finish_async_save(pending: PendingSave, writer: BackgroundWriter, *, wait: bool) -> bool:
    """Collective: when every rank's writer is done (after waiting for this rank's, with `wait`),
    publish the save as save_checkpoint does (manifest, rename, `latest`, pruning) and return True;
    else False. A failed write on any rank stops every rank with one line (as save_checkpoint)."""
    if wait:
        writer.wait()
    done = torch.tensor([1.0 if writer.idle() else 0.0], device=communication_device())
    dist.all_reduce(done, op=dist.ReduceOp.MIN)
    if done.item() < 1.0:
        return False
    written, errors = writer.take()
    _agree_on_save(pending.root, pending.staging, [f"{type(e).__name__}: {e}" for e in errors])
    shares: list[dict[str, dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, {Path(p).relative_to(pending.staging).as_posix(): e for p, e in written.items()})
    if dist.get_rank() == 0:
        entries = {name: entry for share in shares for name, entry in (share or {}).items()}
        fsync_tree(pending.staging)  # the metadata rank 0 wrote when the save started
        for name in manifest.checkpoint_files(pending.staging):
            if name not in entries:  # megalm.json, config.yaml, the tokenizer
                path = pending.staging / name
                entries[name] = {"size": path.stat().st_size, "sha256": manifest.sha256_of(path)}
        manifest.write(pending.staging, entries)
        _publish(pending.root, pending.staging, pending.tag)
        atomic_write_text(pending.root / "latest", pending.tag)
        _prune(pending.root, pending.keep_last, keep=pending.tag)
    dist.barrier()
    return True


def _save_deepspeed(engine: Engine, root: Path, staging: Path, client_state: dict[str, Any]) -> None:
    """DeepSpeed's files of this rank into `staging` (as for a dense model), then its experts' file:
    every file through DeepSpeed's checkpoint engine, so async saves and write errors treat them alike."""
    with seams.dense_checkpoint_files(engine.ds):
        engine.ds.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    experts = _expert_parameters(engine)
    if not experts or engine.dims.expert_data_rank(dist.get_rank()) != 0:
        return  # no expert parallelism, or another rank holding the same experts writes them
    state: dict[str, Any] = {"params": {n: p.detach().clone() for n, p in experts.items()}}
    if engine.ds.zero_optimization_stage() == 0:  # ZeRO 1/2 files hold each rank's own expert states
        state["optimizer"] = {n: seams.zero0_full_state(engine.ds, p) for n, p in experts.items()}
    engine.ds.checkpoint_engine.save(state, str(staging / _experts_file(engine)))


def _expert_parameters(engine: Engine) -> dict[str, torch.nn.Parameter]:
    """This rank's expert-parallel parameters by name (empty without expert parallelism)."""
    return {n: p for n, p in engine.ds.module.named_parameters() if is_expert_parallel(p)}


def _experts_file(engine: Engine) -> str:
    c = engine.dims.coords(dist.get_rank())
    return (f"experts_ep{engine.dims.expert_rank(dist.get_rank()):02d}_"
            f"mp_rank_{c.pipeline * engine.dims.tensor + c.tensor:02d}.pt")


def _load_experts(engine: Engine, ckpt: Path, load_optimizer: bool) -> None:
    """Under expert parallelism: this rank's experts (and at ZeRO-0 their optimizer state) from the
    file its expert rank wrote, over what DeepSpeed's model file gave every rank."""
    experts = _expert_parameters(engine)
    if not experts:
        return
    path = ckpt / _experts_file(engine)
    if not path.is_file():
        raise MegalmError(f"{path} is missing: the checkpoint does not hold this rank's experts")
    state = seams.load_deepspeed_file(path)
    with torch.no_grad():
        for name, p in experts.items():
            p.copy_(state["params"][name])
    if load_optimizer and "optimizer" in state:
        for name, p in experts.items():
            seams.set_full_state(engine.ds, p, state["optimizer"][name])


def _agree_on_save(root: Path, staging: Path, failures: list[str]) -> None:
    """Collective: when any rank failed to write, remove the half-written save and stop every rank
    with the first failure and what is still intact."""
    everyone: list[list[str]] = [[]] * dist.get_world_size()
    dist.all_gather_object(everyone, failures)
    failed = [(r, f[0]) for r, f in enumerate(everyone) if f]
    if not failed:
        return
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    latest = root / "latest"
    kept = f"the previous checkpoint ({latest.read_text().strip()}) and `latest` are intact" if latest.is_file() \
        else "no earlier checkpoint exists"
    rank, why = failed[0]
    hint = " (free space, or lower checkpoint.keep_last)" if "No space left" in why else ""
    raise MegalmError(f"saving checkpoint {staging.name.removesuffix(SAVING)} failed on rank {rank}: {why}{hint}; "
                      f"{kept}")


def _publish(root: Path, staging: Path, tag: str) -> None:
    """Rename the finished save to `tag`; a complete checkpoint already there is set aside first and
    deleted only once the new one is in place (resolve_load falls back to it if the job dies between)."""
    final, replaced = root / tag, root / (tag + REPLACED)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)


def write_metadata(ckpt: Path, meta: CheckpointMeta, tokenizer_files: list[str]) -> None:
    """megalm's files of a checkpoint directory: megalm.json, config.yaml, tokenizer/."""
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt / METADATA_FILE, json.dumps(meta.to_dict(), indent=2))
    atomic_write_text(ckpt / "config.yaml", meta.config_yaml)
    if tokenizer_files:
        (ckpt / "tokenizer").mkdir(exist_ok=True)
        for f in tokenizer_files:
            shutil.copy2(f, ckpt / "tokenizer" / Path(f).name)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, so what this process wrote there is on disk.
    Every rank calls it after its own writes (on a shared file system a rank flushes only its own);
    another rank's temporary file that is renamed meanwhile is skipped: that rank syncs its own."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to path.tmp, fsync it, rename it over `path` and fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every global_stepN directory under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (0: keep all), and what saves that died
    half-way left behind (*.saving, *.replaced)."""
    for leftover in [*root.glob(f"global_step*{SAVING}"), *root.glob(f"global_step*{REPLACED}")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(root)[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_load(load: str, root: Path) -> tuple[Path, str] | None:
    """Where to resume from: (checkpoint root, tag), or None to start fresh.

    auto: RUN_DIR/checkpoints/latest if it exists; none: never; a path: a directory holding a
    `latest` file, or a global_stepN directory itself.
    """
    if load == "none":
        return None
    if load == "auto":
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag).is_dir() and (root / (tag + REPLACED)).is_dir():
            return root, tag + REPLACED  # the job died while a same-step save was being published
        return root, tag
    path = Path(load)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if TAG_RE.match(path.name) and path.is_dir():
        return path.parent, path.name
    raise MegalmError(
        f"checkpoint.load={load}: not a checkpoint (expected a directory with a 'latest' file or a "
        "global_stepN directory)"
    )


def older_checkpoints(root: Path, tag: str) -> list[str]:
    """Tags of the complete checkpoints under `root` older than `tag`, newest first."""
    m = TAG_RE.match(tag.removesuffix(REPLACED))
    step = int(m.group(1)) if m else None
    return [p.name for s, p in reversed(list_checkpoints(root)) if step is None or s < step]


def intact_checkpoint(
    root: Path, tag: str, *, fallback: bool, check: Callable[[Path], str | None],
) -> tuple[str, list[str]]:
    """(the tag to load, what was found damaged on the way): `tag` when check(root / tag) finds it
    intact, else with `fallback` the newest older intact checkpoint; without it one MegalmError that
    names the damaged file and the newest intact checkpoint (and how to resume from it)."""
    damaged: list[str] = []
    for candidate in [tag, *older_checkpoints(root, tag)]:
        path = root / candidate
        damage = check(path) if path.is_dir() else f"{path} is missing"
        if damage is None:
            if damaged and not fallback:
                raise MegalmError(f"checkpoint {tag} is damaged: {damaged[0]}; the newest intact checkpoint is "
                                  f"{path}: resume from it with checkpoint.load={path} (or checkpoint.fallback=true)")
            return candidate, damaged
        damaged.append(damage)
    raise MegalmError(f"checkpoint {tag} is damaged: {damaged[0]}; no intact checkpoint under {root} "
                      "(checkpoint.load=none starts afresh)")


def load_checkpoint(engine: Engine, root: Path, tag: str, *, load_optimizer: bool = True) -> TrainState:
    """Collective: load DeepSpeed state and this rank's RNG states; return where training stands.
    The RNG states are restored only on the layout they were saved at (each rank's own stream)."""
    ckpt = root / tag
    if not ckpt.is_dir():
        raise MegalmError(f"checkpoint {ckpt} does not exist")
    with seams.dense_checkpoint_files(engine.ds), seams.checkpoint_reads(engine.ds):
        path, client = engine.ds.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=True
        )
    if path is None or client is None or "megalm" not in client:
        raise MegalmError(f"checkpoint {ckpt} could not be loaded (incomplete, or not written by megalm)")
    meta = CheckpointMeta.from_dict(client["megalm"], f"the megalm state in {ckpt}")
    _load_experts(engine, ckpt, load_optimizer)
    rng_file = ckpt / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and meta.dims == engine.dims:
        set_rng_state(torch.load(rng_file, weights_only=True), engine.tp.rng)
    return meta.state
