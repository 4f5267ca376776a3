"""Change a checkpoint's tensor/pipeline size: read it unsharded, write it at the new size.

The weights move exactly (fp32 masters when the checkpoint has them); the optimizer is fresh
(Adam moments restart at zero; resharding DeepSpeed's partitioned optimizer state is not
implemented), while the step, the consumed samples (the data order) and the learning-rate
schedule continue where the source stopped. Other settings can change with `section.key=value`
overrides (e.g. zero.stage=1 when going from ZeRO-3 to a pipeline, which DeepSpeed requires).
"""

from __future__ import annotations

import copy
from pathlib import Path

from megalm.config import apply_overrides, config_from_dict
from megalm.convert.reader import open_checkpoint, read_state
from megalm.convert.writer import copy_tokenizer_file, write_checkpoint


def reshard(checkpoint: str | Path, output: str | Path, *, tensor: int, pipeline: int, data_parallel: int = 1,
            overrides: list[str] = (), prefer_master: bool = True) -> Path:
    """Write `checkpoint` at tensor x pipeline (x data_parallel) into the run directory `output`."""
    ckpt = open_checkpoint(checkpoint)
    state, _ = read_state(ckpt, prefer_master)
    run_dir = Path(output)
    raw = copy.deepcopy(ckpt.config.to_dict())
    raw["parallel"].update(tensor=tensor, pipeline=pipeline)
    raw["train"].update(run_dir=str(run_dir), global_batch_size=None, grad_accum_steps=None)
    raw["data"]["cache_dir"] = ""
    if ckpt.config.train.global_batch_size:  # keep the global batch: the data order depends on it
        raw["train"]["global_batch_size"] = ckpt.config.train.global_batch_size
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    tok = ckpt.tokenizer()
    files = tok.files()
    if files:
        cfg.data.tokenizer_model = copy_tokenizer_file(files[0], run_dir)
    return write_checkpoint(
        cfg, state, run_dir, step=ckpt.step, consumed_samples=ckpt.meta.state.consumed_samples,
        tokenizer_info=tok.describe(), tokenizer_files=files, data_parallel=data_parallel,
    )
