"""Weights & Biases as an optional sink, offline: the run's history holds the scalars of
metrics.jsonl (and TensorBoard), its config the resolved config, and a resumed job logs to the same
W&B run. Read back from W&B's own files: its record log, parsed with its protobuf schema."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from megalm.config import load_config
from megalm.testing.distributed import run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import TINY, read_metrics

wandb = pytest.importorskip("wandb")


def _records(path: Path) -> Iterator[object]:
    """The records of a .wandb file (W&B's log: a 7-byte header, 32 KiB blocks of records with a
    7-byte header each: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last of several
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _read_run(path: Path) -> tuple[list[dict], dict]:
    history, config = [], {}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return history, config


@pytest.mark.slow
def test_offline_wandb_run_holds_the_metrics_and_the_config_and_resumes(byte_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    common = [f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={run}", "logging.wandb=true",
              "logging.wandb_mode=offline", "logging.wandb_project=tests", "train.global_batch_size=8",
              "train.micro_batch_size=2", "train.eval_interval=2", "logging.tensorboard=false"]
    run_distributed_test(train_rank, 1, args=(TINY, [*common, "train.steps=3"]), env={"DS_ACCELERATOR": "cpu"})
    run_distributed_test(train_rank, 1, args=(TINY, [*common, "train.steps=5"]), env={"DS_ACCELERATOR": "cpu"})
    run_id = (run / "wandb_id").read_text()
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the resumed job logged to the same W&B run
    history = [h for f in files for h in _read_run(f)[0]]
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5]
    # every scalar of every metrics.jsonl record, under its TensorBoard/W&B name, at its step
    expected: dict[int, dict] = {}
    for r in read_metrics(run):
        for key, value in r.items():
            if key != "step":
                tag = key if key.startswith("lm_eval/") else f"train/{key}" if "val" not in key else f"eval/{key}"
                expected.setdefault(r["step"], {})[tag] = value
    assert {"train/loss", "train/tflops_megatron", "train/consumed_samples", "eval/val_loss"} <= set().union(*expected.values())
    for h in history:
        assert {k: v for k, v in h.items() if not k.startswith("_")} == expected[h["_step"]], h["_step"]
    # the validated config, derived values included (grad_accum_steps = 8 / 2, seq_len from the model)
    config = _read_run(files[0])[1]
    first = load_config(TINY, [*common, "train.steps=3"])
    first.validate(1)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == json.loads(json.dumps(first.to_dict()))
    assert config["train"]["grad_accum_steps"] == 4 and config["data"]["seq_len"] == 64
