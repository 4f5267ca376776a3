"""Loss parity across parallel layouts: the same tiny run under every layout against TP1 PP1 DP1.

Every layout trains the same config on the same data for the same steps with the same global
batch; the per-step losses (mean over the global batch) must equal the single-process
reference: relative 1e-5 in fp32, a stated tolerance in bf16.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megalm.config import load_config
from megalm.testing.distributed import run_distributed_test
from megalm.training.loop import train


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero: int = 1
    context: int = 1
    sequence_parallel: bool = False
    expert: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.context * self.pipeline * self.data

    @property
    def name(self) -> str:
        cp = f" CP{self.context}" if self.context > 1 else ""
        sp = " SP" if self.sequence_parallel else ""
        ep = f" EP{self.expert}" if self.expert > 1 else ""
        return f"TP{self.tensor}{sp}{cp} PP{self.pipeline} DP{self.data}{ep} ZeRO{self.zero}"

    def overrides(self) -> list[str]:
        return [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}", f"zero.stage={self.zero}",
                f"parallel.context={self.context}", f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.expert={self.expert}"]


REFERENCE = Layout()
LAYOUTS = [
    Layout(data=2, zero=0), Layout(data=2, zero=1), Layout(data=2, zero=2), Layout(data=2, zero=3),
    Layout(tensor=2), Layout(pipeline=2), Layout(tensor=2, pipeline=2),
    Layout(tensor=2, data=2, zero=1), Layout(tensor=2, data=2, zero=3),
    Layout(pipeline=2, data=2), Layout(tensor=2, pipeline=2, data=2),
    Layout(tensor=2, sequence_parallel=True), Layout(tensor=2, pipeline=2, sequence_parallel=True),
    Layout(tensor=2, pipeline=2, data=2, sequence_parallel=True),
    Layout(pipeline=2, zero=0), Layout(tensor=2, pipeline=2, zero=0),  # clipped by the norm of every stage (seams)
]


def train_rank(config: str, overrides: list[str]) -> list[float] | None:
    """One rank of a training run of config + overrides; rank 0 returns the logged step losses."""
    cfg = load_config(config, overrides)
    train(cfg)
    if dist.get_rank() != 0:
        return None
    lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def run_layout(layout: Layout, config: str, overrides: list[str], timeout: float = 600) -> list[float]:
    """Per-step losses of a fresh run of `config` under `layout` (spawned gloo ranks)."""
    return run_layout_ranks(layout, config, overrides, timeout=timeout)[0]


def run_layout_ranks(layout: Layout, config: str, overrides: list[str], timeout: float = 600,
                     rank: Callable[[str, list[str]], Any] = train_rank) -> list[Any]:
    """What `rank`(config, overrides) returns on each rank of a fresh run under `layout`."""
    with tempfile.TemporaryDirectory(prefix="megalm-parity-") as run_dir:
        all_overrides = [*overrides, *layout.overrides(), f"train.run_dir={run_dir}",
                         "checkpoint.interval=0", "checkpoint.save_at_end=false", "checkpoint.load=none",
                         "logging.console=false", "logging.tensorboard=false", "train.eval_interval=0"]
        return run_distributed_test(rank, layout.world_size, args=(config, all_overrides),
                                    timeout=timeout, env={"DS_ACCELERATOR": "cpu"})


def max_relative_difference(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference), (len(losses), len(reference))
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
