"""Checkpoints: DeepSpeed's own layout plus megalm's metadata, with a `latest` written last.

    RUN_DIR/checkpoints/
      latest                       tag of the newest COMPLETE checkpoint (written after every rank saved)
      global_stepN/
        mp_rank_XX_model_states.pt, *_optim_states.pt ...   DeepSpeed's files (zero_to_fp32 works)
        megalm.json                CheckpointMeta (megalm.training.checkpoint_meta): format version,
                                   parallel dims, step, consumed samples, tokenizer, config
        config.yaml                the resolved config
        tokenizer/                 the tokenizer's files
        rng_state_rank{R}.pt       python/numpy/torch/cuda RNG states of each rank

DeepSpeed reads its own files with torch.load(weights_only=False) (its checkpoint engine needs
pickled optimizer objects); megalm's own files (RNG states) are loaded with weights_only=True.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalm.errors import MegalmError
from megalm.training.checkpoint_meta import METADATA_FILE, CheckpointMeta, TrainState

TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_of(step: int) -> str:
    return f"global_step{step}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any, root: Path, meta: CheckpointMeta, tokenizer_files: list[str], keep_last: int,
) -> Path:
    """Collective: every rank saves its part; rank 0 writes metadata and, last, `latest`."""
    tag = tag_of(meta.state.step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={"megalm": meta.to_dict()}, save_latest=False)
    ckpt = root / tag
    _atomic_torch_save(rng_state(), ckpt / f"rng_state_rank{rank}.pt")
    if rank == 0:
        _write_metadata(ckpt, meta, tokenizer_files)
    dist.barrier()  # every rank's files are on disk before `latest` points at them
    if rank == 0:
        atomic_write_text(root / "latest", tag)
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return ckpt


def _write_metadata(ckpt: Path, meta: CheckpointMeta, tokenizer_files: list[str]) -> None:
    atomic_write_text(ckpt / METADATA_FILE, json.dumps(meta.to_dict(), indent=2))
    atomic_write_text(ckpt / "config.yaml", meta.config_yaml)
    if tokenizer_files:
        (ckpt / "tokenizer").mkdir(exist_ok=True)
        for f in tokenizer_files:
            shutil.copy2(f, ckpt / "tokenizer" / Path(f).name)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        return (root, latest.read_text().strip()) if latest.is_file() else None
    path = Path(load)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if TAG_RE.match(path.name) and path.is_dir():
        return path.parent, path.name
    raise MegalmError(
        f"checkpoint.load={load}: not a checkpoint (expected a directory with a 'latest' file or a "
        "global_stepN directory)"
    )


def load_checkpoint(engine: Any, root: Path, tag: str, *, load_optimizer: bool = True) -> TrainState:
    """Collective: load DeepSpeed state and this rank's RNG; return where training stands."""
    ckpt = root / tag
    if not ckpt.is_dir():
        raise MegalmError(f"checkpoint {ckpt} does not exist")
    path, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=True
    )
    if path is None or client is None or "megalm" not in client:
        raise MegalmError(f"checkpoint {ckpt} could not be loaded (incomplete, or not written by megalm)")
    meta = CheckpointMeta.from_dict(client["megalm"], f"the megalm state in {ckpt}")
    rng_file = ckpt / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file() and meta.dims.world_size == dist.get_world_size():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta.state
