"""Write a universal checkpoint as a megalm training checkpoint at any tensor / pipeline / data size.

The route is the trainer's own: T x P x D gloo ranks (megalm.parallel.spawn) start as training does
(megalm.training.startup.bootstrap) with the universal checkpoint's weights copied into the model
before DeepSpeed takes it, set the exact fp32 masters, Adam moments, step and learning-rate schedule
(megalm.convert.universal) and save with megalm.training.checkpoint's save_checkpoint. So the
files, megalm.json and `latest` are exactly what `python -m megalm.train` writes and resumes from.
`reshard` and `from-hf` both come this way (a checkpoint -> its universal form -> here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from megalm.config import Config, config_from_dict
from megalm.convert.universal import UniversalCheckpoint
from megalm.errors import MegalmError
from megalm.parallel.spawn import spawn
from megalm.training.checkpoint import save_checkpoint, tag_of
from megalm.training.checkpoint_meta import CheckpointMeta
from megalm.training.startup import bootstrap


def write_checkpoint(
    cfg: Config, universal: Path, run_dir: Path, *, tokenizer_files: list[str] = (), data_parallel: int = 1,
    timeout: float = 3600.0,
) -> Path:
    """Write RUN_DIR/config.yaml and RUN_DIR/checkpoints/{global_step<step>, latest} from the universal
    checkpoint directory `universal`; return the tag dir. `cfg` is validated for tensor x pipeline x
    data_parallel ranks."""
    world = cfg.parallel.tensor * cfg.parallel.pipeline * data_parallel
    cfg.validate(world)
    if (run_dir / "checkpoints").exists():
        raise MegalmError(f"{run_dir}/checkpoints already exists; choose a new output directory")
    source = UniversalCheckpoint.open(universal)
    source.check_model(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    args = (cfg.to_yaml(), str(universal), str(run_dir / "checkpoints"), list(tokenizer_files))
    spawn(_write_rank, world, args=args, timeout=timeout, env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    raw = cfg.to_dict()
    raw["train"]["grad_accum_steps"] = None  # derived again on resume: train.global_batch_size may change
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return run_dir / "checkpoints" / tag_of(source.meta.state.step)


def _write_rank(cfg_yaml: str, universal: str, root: str, tokenizer_files: list[str]) -> None:
    """One rank of the writer: the trainer's start-up, resumed from the universal checkpoint, saved."""
    cfg = config_from_dict(yaml.safe_load(cfg_yaml))
    source = UniversalCheckpoint.open(Path(universal))
    rt = bootstrap(cfg, prepare_model=source.weight_loader(cfg))
    state = source.load_optimizer(rt.engine, cfg)
    meta = CheckpointMeta.of_run(cfg, rt.dims, state, source.meta.tokenizer, source.meta.data)  # the data resumes on
    save_checkpoint(rt.engine, Path(root), meta, tokenizer_files, keep_last=0)


def copy_tokenizer_file(src: str, run_dir: Path) -> str:
    """Copy a tokenizer file into RUN_DIR/tokenizer/ so the written config.yaml stays valid."""
    dst = run_dir / "tokenizer" / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() != dst.resolve():
        shutil.copy2(src, dst)
    return str(dst)


def describe_written(ckpt: Path) -> str:
    return f"{ckpt} ({CheckpointMeta.read(ckpt).describe()})"
