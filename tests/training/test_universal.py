"""Resume anywhere: train 6 steps at layout A, convert the checkpoint to its universal form, resume at
layout B for 6 more: steps 7-12 equal an uninterrupted 12-step run at A (fp32, tiny config).
The converted masters and both Adam moments equal what DeepSpeed holds for the source, bitwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.convert.universal import UniversalCheckpoint, convert_to_universal, local_shard
from megalm.testing.distributed import run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import REPO, TINY, step_losses, train_env

COMMON = ["train.steps=12", "train.micro_batch_size=2", "train.global_batch_size=8", "train.precision=fp32",
          "checkpoint.interval=6", "checkpoint.keep_last=0", "train.eval_interval=0", "logging.console=false",
          "logging.tensorboard=false", "data.num_workers=0"]
TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]
TRANSITIONS = {  # name: (world A, layout A, world B, layout B)
    "tp2pp2-z1_to_dp2-z1": (4, [*TP2PP2, "zero.stage=1"], 2, ["zero.stage=1"]),
    "dp2-z2_to_dp4-z2": (2, ["zero.stage=2"], 4, ["zero.stage=2"]),
    "dp2-z3_to_tp2-z3": (2, ["zero.stage=3"], 2, ["parallel.tensor=2", "zero.stage=3"]),
    "tp1pp1_to_tp2pp2": (1, ["zero.stage=1"], 4, [*TP2PP2, "zero.stage=1"]),
    "dp4_to_dp2": (4, ["zero.stage=1"], 2, ["zero.stage=1"]),
    "dp2-z0_to_tp2-z1": (2, ["zero.stage=0"], 2, ["parallel.tensor=2", "zero.stage=1"]),
    "dp2-z1_to_one-z0": (2, ["zero.stage=1"], 1, ["zero.stage=0"]),
    "cp2-z1_to_one-z1": (2, ["parallel.context=2", "zero.stage=1"], 1, ["zero.stage=1"]),
    "dp2-z2_to_cp2dp2-z2": (2, ["zero.stage=2"], 4, ["parallel.context=2", "zero.stage=2"]),
}


def _train(run_dir: Path, world: int, overrides: list[str]) -> dict[int, float]:
    run_distributed_test(train_rank, world, args=(TINY, [*COMMON, f"train.run_dir={run_dir}", *overrides]),
                         timeout=600, env={"DS_ACCELERATOR": "cpu"})
    return step_losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRANSITIONS))
def test_resume_at_another_layout_continues_exactly(name, byte_shards, tmp_path):
    world_a, layout_a, world_b, layout_b = TRANSITIONS[name]
    data = f"data.train_prefixes=[{byte_shards}]"
    straight = _train(tmp_path / "a", world_a, [data, *layout_a])  # uninterrupted, saves at 6 and 12
    universal = tmp_path / "u"
    convert_to_universal(tmp_path / "a" / "checkpoints" / "global_step6", universal)
    resumed = _train(tmp_path / "b", world_b, [data, *layout_b, f"checkpoint.load={universal}"])
    assert sorted(resumed) == list(range(7, 13))
    worst = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in range(7, 13))
    assert worst < 1e-5, (worst, resumed, straight)


def _compare_with_deepspeed(config_overrides: list[str], source: str, universal: str) -> dict:
    """On the source's layout: load the DeepSpeed checkpoint as training does and compare every
    parameter's master and moments (DeepSpeed's view, this rank's tensor shard) with the universal files."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megalm import seams
    from megalm.config import load_config
    from megalm.parallel.pipeline import gpt_name
    from megalm.training import checkpoint as ckpt
    from megalm.training.startup import bootstrap

    cfg = load_config(TINY, config_overrides)
    rt = bootstrap(cfg)
    ckpt.load_checkpoint(rt.engine, Path(source).parent, Path(source).name)
    u = UniversalCheckpoint.open(Path(universal))
    step = float(u.tensor("final_norm.norm.weight", "step"))
    seams.prepare_optimizer_state(rt.engine.ds, step)  # links ZeRO-1/2's fragments to the loaded moments
    inner = getattr(rt.engine.ds.optimizer, "optimizer", rt.engine.ds.optimizer)
    checked, differ = 0, []
    for name, param in rt.engine.ds.module.named_parameters():
        gpt = gpt_name(name, cfg.model.num_layers)
        ours = {k: local_shard(u.tensor(gpt, k), gpt, param, rt.engine.tp.rank, rt.engine.tp.size)
                for k in ("fp32", "exp_avg", "exp_avg_sq")}
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            theirs = {"fp32": safe_get_full_fp32_param(param), "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
                      "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")}
        else:  # ZeRO-0 fp32: the module's weights are the masters
            theirs = {"fp32": param.detach(), **{k: inner.state[param][k] for k in ("exp_avg", "exp_avg_sq")}}
        for key, value in theirs.items():
            checked += 1
            if not torch.equal(value.float().view_as(ours[key]), ours[key]):
                differ.append((name, key))
    return {"checked": checked, "differ": differ}


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [(4, [*TP2PP2, "zero.stage=1"]), (2, ["zero.stage=3", "train.precision=bf16"]),
                                           (2, ["parallel.tensor=2", "zero.stage=0"])], ids=["tp2pp2-z1", "dp2-z3-bf16", "tp2-z0"])
def test_converted_states_equal_the_originals_bitwise(world, layout, byte_shards, tmp_path):
    overrides = [*COMMON, f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={tmp_path / 'a'}", *layout,
                 "train.steps=10"]
    run_distributed_test(train_rank, world, args=(TINY, overrides), timeout=600, env={"DS_ACCELERATOR": "cpu"})
    source = tmp_path / "a" / "checkpoints" / "global_step6"
    convert_to_universal(source, tmp_path / "u")
    results = run_distributed_test(_compare_with_deepspeed, world,
                                   args=([*overrides, "checkpoint.load=none"], str(source), str(tmp_path / "u" / "global_step6")),
                                   timeout=600, env={"DS_ACCELERATOR": "cpu"})
    for r in results:
        assert r["checked"] >= 3 * 4 and r["differ"] == [], r


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bad_universal_input_is_one_line(byte_shards, tmp_path):
    data = f"data.train_prefixes=[{byte_shards}]"
    _train(tmp_path / "a", 1, [data, "train.steps=10"])
    universal = tmp_path / "u"
    r = _tool("tools/convert_checkpoint.py", "universal", "--checkpoint", str(tmp_path / "a"), "--output", str(universal))
    assert r.returncode == 0 and "resume at any layout" in r.stdout, r.stderr[-2000:]
    train = ["-m", "megalm.train", "--config", TINY, data, *COMMON, f"checkpoint.load={universal}",
             f"train.run_dir={tmp_path / 'b'}"]
    cases = {
        "model.hidden_size=128": "is of another model: model.hidden_size is 64 there and 128 here",
        "model.vocab_size=300": "is of another model: model.vocab_size is 257 there and 300 here",
    }
    for override, message in cases.items():
        r = _tool(*train, override)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], (override, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and not (tmp_path / "b" / "checkpoints").exists()
    r = _tool("tools/convert_checkpoint.py", "reshard", "--checkpoint", str(universal), "--output", str(tmp_path / "c"),
              "--tp", "4")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: model.num_kv_heads (2) must divide by parallel.tensor (4)"), r.stderr[-2000:]
    assert not (tmp_path / "c" / "checkpoints").exists()
    (universal / "global_step10" / "zero" / "blocks.1.mlp.fc2.weight" / "exp_avg_sq.pt").unlink()
    r = _tool(*train)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]  # found by its manifest
    assert r.returncode == 2 and len(errors) == 1 and "global_step10 is damaged: " in errors[0] and \
        "blocks.1.mlp.fc2.weight/exp_avg_sq.pt is missing" in errors[0], r.stderr[-2000:]
    r = _tool("tools/convert_checkpoint.py", "universal", "--checkpoint", str(tmp_path / "nope"), "--output",
              str(tmp_path / "u2"))
    assert r.returncode == 2 and not (tmp_path / "u2").exists() and not (tmp_path / "u2.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [(4, [*TP2PP2, "zero.stage=1"]),
                                           (2, ["parallel.tensor=2", "model.tie_embeddings=true", "train.precision=bf16"])],
                         ids=["tp2pp2-z1", "tp2-tied"])
def test_deepspeeds_own_converter_reads_megalm_checkpoints(world, layout, byte_shards, tmp_path):
    # every checkpoint carries universal_checkpoint_info: DeepSpeed's ds_to_universal converts it, and
    # agrees with megalm's conversion bitwise (megalm's pipeline names mapped to the GPT's). DeepSpeed's
    # tool reads ZeRO 1/2 files only: tp2-tied is bf16, which keeps ZeRO-1 on one data-parallel rank
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    from megalm.parallel.pipeline import gpt_name

    overrides = [*COMMON, f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={tmp_path / 'a'}", *layout,
                 "train.steps=3", "checkpoint.interval=0"]
    run_distributed_test(train_rank, world, args=(TINY, overrides), timeout=600, env={"DS_ACCELERATOR": "cpu"})
    theirs = tmp_path / "ds" / "global_step3"
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(tmp_path / "a" / "checkpoints" / "global_step3"), output_folder=str(theirs),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    ours = convert_to_universal(tmp_path / "a", tmp_path / "ours")
    files = [f for f in sorted(theirs.glob("zero/*/*.pt")) if f.stem in ("fp32", "exp_avg", "exp_avg_sq")]
    assert len(files) >= 3 * 14
    for f in files:
        expected = torch.load(ours / "zero" / gpt_name(f.parent.name, 2) / f.name)["param"]
        assert torch.equal(torch.load(f, weights_only=False)["param"], expected), f
