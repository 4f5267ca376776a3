"""Damaged checkpoints are named, not crashed on: every checkpoint carries a manifest (files, sizes,
sha256) written before `latest` names it; a missing, truncated or corrupt file is one line naming it
and the newest intact checkpoint, checkpoint.load=auto falls back to that one (checkpoint.fallback),
and a save that fails on one rank (disk full) stops every rank with one line, the previous
checkpoint and `latest` intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megalm.errors import MegalmError
from megalm.testing.distributed import run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import REPO, TINY, assert_resumed, loss_steps, step_losses, train_env
from megalm.training import manifest
from megalm.training.checkpoint import intact_checkpoint

RUN = ["train.steps=10", "checkpoint.interval=5", "checkpoint.keep_last=0", "train.precision=fp32",
       "train.global_batch_size=8", "logging.tensorboard=false", "train.eval_interval=0"]


def _fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"global_step{step}"
    (ckpt / "zero").mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    (ckpt / "zero" / "optim_states.pt").write_bytes(os.urandom(300))
    manifest.record(ckpt)
    return ckpt


def test_manifest_names_missing_truncated_corrupt_files(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 10)
    entries = json.loads((ckpt / manifest.MANIFEST_FILE).read_text())["files"]
    assert sorted(entries) == ["mp_rank_00_model_states.pt", "zero/optim_states.pt"]
    assert manifest.check(ckpt) is None
    model = ckpt / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    model.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit, same size
    assert manifest.check(ckpt, digest=False) is None  # sizes alone cannot see it
    assert manifest.check(ckpt) == f"{model} is corrupt (its sha256 differs from the manifest's)"
    assert manifest.check(ckpt, share=(1, 2)) is None  # this file is rank 0's share
    model.write_bytes(data[:4000])
    assert manifest.check(ckpt, digest=False) == f"{model} is truncated (4000 of 5000 bytes)"
    model.unlink()
    assert manifest.check(ckpt) == f"{model} is missing"
    (ckpt / manifest.MANIFEST_FILE).write_text("{not json")
    assert "manifest.json is damaged" in manifest.check(ckpt)


def test_intact_checkpoint_falls_back_or_names_the_intact_one(tmp_path):
    _fake_checkpoint(tmp_path, 5)
    ten = _fake_checkpoint(tmp_path, 10)
    (ten / "mp_rank_00_model_states.pt").write_bytes(b"short")
    assert intact_checkpoint(tmp_path, "global_step10", fallback=True, check=manifest.check) == (
        "global_step5", [f"{ten / 'mp_rank_00_model_states.pt'} is truncated (5 of 5000 bytes)"])
    with pytest.raises(MegalmError, match=r"checkpoint global_step10 is damaged: .*truncated.*; the newest intact "
                                          r"checkpoint is .*global_step5: resume from it with checkpoint.load="):
        intact_checkpoint(tmp_path, "global_step10", fallback=False, check=manifest.check)
    (tmp_path / "global_step5" / "zero" / "optim_states.pt").unlink()
    with pytest.raises(MegalmError, match="no intact checkpoint under"):
        intact_checkpoint(tmp_path, "global_step10", fallback=True, check=manifest.check)


def _train(run_dir: Path, prefix: str, *extra: str) -> None:
    run_distributed_test(train_rank, 1, args=(TINY, [f"data.train_prefixes=[{prefix}]", f"train.run_dir={run_dir}",
                                                     *RUN, *extra]), env={"DS_ACCELERATOR": "cpu"})


def _train_cli(run_dir: Path, prefix: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalm.train", "--config", TINY, f"data.train_prefixes=[{prefix}]",
                           f"train.run_dir={run_dir}", *RUN, *extra], env=train_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_damaged_latest_falls_back_to_the_intact_checkpoint_and_continues_exactly(byte_shards, tmp_path):
    straight = tmp_path / "straight"
    _train(straight, byte_shards)
    ten = straight / "checkpoints" / "global_step10"
    assert manifest.check(ten) is None and (straight / "checkpoints" / "latest").read_text() == "global_step10"
    files = json.loads((ten / manifest.MANIFEST_FILE).read_text())["files"]
    assert {"megalm.json", "mp_rank_00_model_states.pt", "rng_state_rank0.pt"} <= set(files)
    model = ten / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-1000])  # truncated, as a node dying mid-copy leaves it

    # tools read nothing and write nothing from a damaged checkpoint
    out = tmp_path / "hf"
    tool = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "to-hf", "--checkpoint",
                           str(straight), "--output", str(out)], env=train_env(), capture_output=True, text=True)
    line = (f"error: checkpoint {ten} is damaged: {model} is truncated ({files[model.name]['size'] - 1000} of "
            f"{files[model.name]['size']} bytes); the newest intact checkpoint is {ten.parent / 'global_step5'}")
    assert tool.returncode == 2 and not out.exists(), tool.stderr
    assert tool.stderr.strip().splitlines()[-1] == line
    for args in (["generate.py", "--prompt", "a"], ["evaluate.py", "--text-file", str(model)]):
        other = subprocess.run([sys.executable, str(REPO / "tools" / args[0]), "--checkpoint", str(straight), *args[1:]],
                               env=train_env(), capture_output=True, text=True)
        assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == line, other.stderr[-2000:]

    # training: fallback off says what to do; on (the default) resumes at step 5 with a warning
    refused = _train_cli(straight, byte_shards, "checkpoint.fallback=false", "train.steps=12")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "global_step10 is damaged" in refused.stderr and "checkpoint.load=" in refused.stderr
    before = step_losses(straight)
    written = len(loss_steps(straight))
    resumed = _train_cli(straight, byte_shards, "train.steps=12")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: checkpoint global_step10 is damaged" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step 5," in resumed.stdout
    assert_resumed(straight, written, 5, 12)  # from the intact step 5, not from scratch
    after = step_losses(straight)
    assert [after[s] for s in range(6, 11)] == [before[s] for s in range(6, 11)]  # bit-identical replay
    assert manifest.check(straight / "checkpoints" / "global_step10") is None  # saved again, whole


def _full_disk_rank(config: str, overrides: list[str]) -> str | None:
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        if os.environ.get("RANK") == "1" and "global_step10" in str(f) and "optim_states" in str(f):
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    torch.save = save
    try:
        train_rank(config, overrides)
    except MegalmError as e:
        dist.barrier()  # both ranks failed the same way
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_a_save_stops_every_rank_with_one_line(byte_shards, tmp_path, mode):
    run = tmp_path / "run"
    overrides = [f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={run}", *RUN,
                 f"checkpoint.async_save={str(mode == 'async').lower()}"]
    messages = run_distributed_test(_full_disk_rank, 2, args=(TINY, overrides), env={"DS_ACCELERATOR": "cpu"})
    assert messages[0] == messages[1]
    assert messages[0].startswith("saving checkpoint global_step10 failed on rank 1: OSError: [Errno 28] No space "
                                  "left on device")
    assert "the previous checkpoint (global_step5) and `latest` are intact" in messages[0]
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "global_step5" and manifest.check(root / "global_step5") is None
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("global_step")) == ["global_step5"]


def _torchrun_2(run_dir: Path, prefix: str, *extra: str) -> subprocess.CompletedProcess:
    """2 ranks under torchrun, each output line tagged with its rank ([default0]:, [default1]:)."""
    from megalm.testing.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--tee", "3", "-m", "megalm.train", "--config", TINY,
           f"data.train_prefixes=[{prefix}]", f"train.run_dir={run_dir}", *RUN, *extra]
    return subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_bit_flip_in_rank_1s_share_is_seen_by_both_ranks_and_converters_write_nothing(byte_shards, tmp_path):
    run = tmp_path / "run"
    first = _torchrun_2(run, byte_shards)  # DP2 ZeRO-1: optimizer partitions of both ranks
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ten = run / "checkpoints" / "global_step10"
    names = sorted(json.loads((ten / manifest.MANIFEST_FILE).read_text())["files"])
    victim = ten / next(n for n in names[1::2] if "optim_states" in n)  # hashed by rank 1, not rank 0
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, the size unchanged
    victim.write_bytes(bytes(data))
    corrupt = f"{victim} is corrupt (its sha256 differs from the manifest's)"
    assert manifest.check(ten, share=(1, 2)) == corrupt and manifest.check(ten, share=(0, 2)) is None

    # the converters read the optimizer too: one line, exit 2, nothing written
    for command in (["reshard", "--output", str(tmp_path / "resharded"), "--tp", "2"],
                    ["universal", "--output", str(tmp_path / "universal")]):
        tool = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), command[0],
                               "--checkpoint", str(run), *command[1:]], env=train_env(), capture_output=True, text=True)
        assert tool.returncode == 2, tool.stderr[-2000:]
        assert corrupt in tool.stderr.strip().splitlines()[-1] and "Traceback" not in tool.stderr
        assert not Path(command[2]).exists(), command[0]

    # no fallback: each rank stops with the same line (rank 0 hashed nothing wrong itself)
    refused = _torchrun_2(run, byte_shards, "checkpoint.fallback=false", "train.steps=12")
    assert refused.returncode != 0
    lines = {rank: [line.split(":", 1)[1] for line in refused.stdout.splitlines() + refused.stderr.splitlines()
                    if line.startswith(f"[default{rank}]:error:")] for rank in (0, 1)}
    assert lines[0] == lines[1] and len(lines[0]) == 1 and corrupt in lines[0][0], refused.stderr[-3000:]
    # fallback (the default): both ranks resume from step 5 together
    written = len(loss_steps(run))
    resumed = _torchrun_2(run, byte_shards, "train.steps=12")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: checkpoint global_step10 is damaged: {corrupt}" in resumed.stdout
    assert_resumed(run, written, 5, 12)
