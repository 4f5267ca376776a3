"""Stragglers are named: one rank (0 or 1) slowed by a sleep in its forward pass is reported with its
node and ratio, in the console, metrics.jsonl and TensorBoard's scalars; with no slowed rank nothing
is printed."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megalm.testing.distributed import run_distributed_test
from megalm.testing.runs import TINY


def _slow_rank(config: str, overrides: list[str], slowed: int | None) -> list[dict] | None:
    from megalm.config import load_config
    from megalm.training import loop

    real = loop.model_loss

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if slowed is None or os.environ.get("RANK") == str(slowed):  # None: both alike (the sleep outweighs noise)
            time.sleep(0.05)
        return real(*args, **kwargs)

    loop.model_loss = slow
    cfg = load_config(config, overrides)
    loop.train(cfg)
    if dist.get_rank() != 0:
        return None
    return [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("slowed", [1, 0, None], ids=["rank1", "rank0", "none"])
def test_a_slowed_rank_is_named_with_its_node_and_ratio(byte_shards, tmp_path, capfd, slowed):
    overrides = [f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={tmp_path}", "train.steps=8",
                 "train.global_batch_size=8", "train.micro_batch_size=1", "logging.straggler_interval=4", "checkpoint.save_at_end=false",
                 "logging.tensorboard=true"]
    records = run_distributed_test(_slow_rank, 2, args=(TINY, overrides, slowed), env={"DS_ACCELERATOR": "cpu"})[0]
    reports = [r for r in records if "straggler_ratio" in r]
    assert [r["step"] for r in reports] == [4, 8]
    out = capfd.readouterr().out
    if slowed is None:  # equal ranks: the report is logged, no warning printed
        assert all(r["straggler_ratio"] < 1.5 for r in reports), reports
        assert "warning: straggler" not in out
        return
    for r in reports:
        # 4 micro batches per step on each rank, 0.05 s each: the slowed rank takes 0.2 s more per step
        assert r["straggler_rank"] == slowed and r["straggler_ratio"] >= 1.5 and r["straggler_seconds"] > 0.2
    assert f"warning: straggler at steps 1-4: rank {slowed} on {socket.gethostname()} takes" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/straggler_ratio")] == [4, 8]
