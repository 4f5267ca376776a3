"""Change a checkpoint's tensor/pipeline size: read it unsharded, write it at the new size.

The fp32 master weights, both Adam moments and Adam's step move exactly (through the checkpoint's
universal form, megalm.convert.universal), and the step, the consumed samples (the data order) and
the learning-rate schedule continue where the source stopped. Other settings can change with `section.key=value`
overrides (e.g. zero.stage=1 when going from ZeRO-3 to a pipeline, which DeepSpeed requires).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from megalm.config import apply_overrides, config_from_dict
from megalm.convert.reader import open_checkpoint
from megalm.convert.universal import convert_to_universal
from megalm.convert.writer import copy_tokenizer_file, write_checkpoint


def reshard(checkpoint: str | Path, output: str | Path, *, tensor: int, pipeline: int, data_parallel: int = 1,
            expert: int = 1, overrides: list[str] = ()) -> Path:
    """Write `checkpoint` (any layout, or universal) at tensor x pipeline (x data_parallel, with
    `expert` of its ranks splitting the experts) into the run directory `output`, through its
    universal form."""
    ckpt = open_checkpoint(checkpoint, optimizer=True)  # every file checked before anything is written
    run_dir = Path(output)
    raw = copy.deepcopy(ckpt.config.to_dict())
    raw["parallel"].update(tensor=tensor, pipeline=pipeline, expert=expert)
    raw["train"].update(run_dir=str(run_dir), global_batch_size=None, grad_accum_steps=None)
    raw["data"]["cache_dir"] = ""
    if ckpt.config.train.global_batch_size:  # keep the global batch: the data order depends on it
        raw["train"]["global_batch_size"] = ckpt.config.train.global_batch_size
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    files = ckpt.tokenizer().files()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if files:
            cfg.data.tokenizer_model = copy_tokenizer_file(files[0], run_dir)
        with tempfile.TemporaryDirectory(prefix=".megalm-universal-", dir=run_dir) as tmp:
            universal = ckpt.path if ckpt.meta.kind == "universal" else convert_to_universal(ckpt.path, Path(tmp) / "u")
            return write_checkpoint(cfg, universal, run_dir, tokenizer_files=files, data_parallel=data_parallel)
    except BaseException:
        if created:  # nothing of a failed reshard is left behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
