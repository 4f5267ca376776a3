"""megalm.json: the typed, versioned metadata every megalm checkpoint carries.

One frozen dataclass writes and reads it. Training and the checkpoint writer build it with
`CheckpointMeta.of_run`; every reader (resume, to-hf, reshard, generate, evaluate) gets it from
`CheckpointMeta.read`. A file of an unknown format version, or one megalm did not write, is one
clear line, never a KeyError deep in a converter.

    {"format_version": 1, "megalm_version": "0.1.0", "kind": "deepspeed",
     "parallel": {"tensor": 2, "pipeline": 1, "data": 2}, "world_size": 4,
     "step": 10, "consumed_samples": 80, "skipped_steps": 0,
     "tokenizer": {"type": "byte", "vocab_size": 257, ...}, "config_yaml": "model: ..."}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from megalm import __version__
from megalm.config import Config, config_from_dict
from megalm.errors import MegalmError
from megalm.parallel.dims import ParallelDims
from megalm.training.ds_config import deepspeed_zero_stage

FORMAT_VERSION = 1
"""Bumped whenever a field changes meaning or a reader needs a new one."""

METADATA_FILE = "megalm.json"

KINDS = ("deepspeed", "universal")
"""deepspeed: DeepSpeed's files of the layout in `parallel` (resumes at that layout); universal: one
full tensor per parameter and state (megalm.convert.universal; resumes at any layout)."""


@dataclass(frozen=True)
class TrainState:
    """What the loop needs to continue: optimizer steps done and global samples consumed."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


@dataclass(frozen=True)
class CheckpointMeta:
    """The layout a checkpoint was written at, where training stood, its tokenizer and config."""

    dims: ParallelDims
    state: TrainState
    tokenizer: dict[str, Any]
    config_yaml: str
    kind: str = "deepspeed"
    megalm_version: str = __version__
    format_version: int = FORMAT_VERSION
    written_zero_stage: int | None = None
    """The ZeRO stage DeepSpeed wrote the files with (megalm.training.ds_config.deepspeed_zero_stage);
    None (metadata from before it was recorded): the config's zero.stage."""
    data: dict[str, Any] | None = None
    """What the run trained on (megalm.training.data.TrainData.checkpoint_state): the mixture plan,
    each source's position and fingerprint, data.seq_len and data.split; None: not recorded (converted
    from Hugging Face, or written before it was)."""

    @classmethod
    def of_run(cls, cfg: Config, dims: ParallelDims, state: TrainState, tokenizer: dict[str, Any],
               data: dict[str, Any] | None = None) -> CheckpointMeta:
        return cls(dims=dims, state=state, tokenizer=dict(tokenizer), config_yaml=cfg.to_yaml(),
                   written_zero_stage=deepspeed_zero_stage(cfg, dims.zero_shards, dims.pipeline), data=data)

    def check_optimizer(self, cfg: Config) -> None:
        """One line when the checkpoint's optimizer state is another optimizer's than `cfg` resumes with
        (AdamW's moments are not Muon's momentum, nor the reverse)."""
        if self.config.optimizer.name != cfg.optimizer.name:
            raise MegalmError(f"the checkpoint was written with optimizer.name={self.config.optimizer.name}, this run "
                              f"has optimizer.name={cfg.optimizer.name}: their states differ; set "
                              "checkpoint.reset_optimizer=true to start a fresh optimizer from its weights")

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the checkpoint's DeepSpeed files."""
        return self.config.zero.stage if self.written_zero_stage is None else self.written_zero_stage

    @cached_property
    def config(self) -> Config:
        """The resolved config the checkpoint was trained with."""
        return config_from_dict(yaml.safe_load(self.config_yaml), "the checkpoint's config")

    def describe(self) -> str:
        d = self.dims
        layout = "universal, from " if self.kind == "universal" else ""
        context = f", context {d.context}" if d.context > 1 else ""
        expert = f", expert {d.expert}" if d.expert > 1 else ""
        return f"{layout}tensor {d.tensor}{context}, pipeline {d.pipeline}, data {d.data}{expert}, step {self.state.step}"

    def to_dict(self) -> dict[str, Any]:
        d, s = self.dims, self.state
        return {
            "format_version": self.format_version, "megalm_version": self.megalm_version, "kind": self.kind,
            "parallel": {"tensor": d.tensor, "pipeline": d.pipeline, "data": d.data, "context": d.context,
                         "expert": d.expert},
            "world_size": d.world_size,
            "step": s.step, "consumed_samples": s.consumed_samples, "skipped_steps": s.skipped_steps,
            "tokenizer": self.tokenizer, "config_yaml": self.config_yaml,
            **({} if self.written_zero_stage is None else {"zero_stage": self.written_zero_stage}),
            **({} if self.data is None else {"data": self.data}),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> CheckpointMeta:
        """Parse the JSON object; anything but format FORMAT_VERSION written by megalm is a MegalmError."""
        if not isinstance(raw, dict) or "format_version" not in raw:
            raise MegalmError(f"{source} is not megalm checkpoint metadata (no format_version): "
                              "the checkpoint was not written by megalm, or by a megalm older than 0.1.0")
        if raw["format_version"] != FORMAT_VERSION:
            raise MegalmError(f"{source} has metadata format {raw['format_version']!r}; this megalm "
                              f"({__version__}) reads format {FORMAT_VERSION}: use the megalm that wrote it")
        try:
            p = raw["parallel"]
            if raw["kind"] not in KINDS:
                raise ValueError(f"kind {raw['kind']!r} is not one of {KINDS}")
            return cls(
                dims=ParallelDims(tensor=int(p["tensor"]), pipeline=int(p["pipeline"]), data=int(p["data"]),
                                  context=int(p.get("context", 1)),  # absent before context parallelism
                                  expert=int(p.get("expert", 1))),  # absent before expert parallelism
                state=TrainState(int(raw["step"]), int(raw["consumed_samples"]), int(raw["skipped_steps"])),
                tokenizer=dict(raw["tokenizer"]), config_yaml=str(raw["config_yaml"]),
                kind=raw["kind"], megalm_version=str(raw["megalm_version"]),
                written_zero_stage=None if raw.get("zero_stage") is None else int(raw["zero_stage"]),
                data=raw.get("data") if isinstance(raw.get("data"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MegalmError(f"{source}: metadata format {FORMAT_VERSION} with a missing or malformed "
                              f"field ({type(e).__name__}: {e}); the file is damaged") from None

    @classmethod
    def read(cls, checkpoint_dir: Path) -> CheckpointMeta:
        """The metadata of a global_stepN directory."""
        path = checkpoint_dir / METADATA_FILE
        if not path.is_file():
            raise MegalmError(f"{checkpoint_dir} has no {METADATA_FILE}: not a complete megalm checkpoint")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MegalmError(f"{path} is not valid JSON: the file is damaged or truncated") from None
        return cls.from_dict(raw, str(path))
