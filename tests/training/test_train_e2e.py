"""A real run of the trainer: what it writes (metrics, TensorBoard, checkpoints) and its options."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from megalm.testing.distributed import run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import TINY, read_metrics, step_losses, train_env

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "tflops_megatron", "mfu",
             "mfu_megatron", "mem_gib", "step_time_s", "data_wait_s", "consumed_samples", "skipped_steps"}


@pytest.mark.slow
def test_tp2_run_writes_metrics_tensorboard_and_checkpoints(byte_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={run_dir}", "parallel.tensor=2",
                 "train.steps=6", "train.eval_interval=3", "checkpoint.interval=2", "checkpoint.keep_last=2",
                 "logging.peak_tflops=0.5", "train.precision=bf16"]
    run_distributed_test(train_rank, 2, args=(TINY, overrides), env={"DS_ACCELERATOR": "cpu"})

    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(STEP_KEYS <= set(r) for r in steps)
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in steps)
    assert [r["consumed_samples"] for r in steps] == [4 * s for s in range(1, 7)]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[0]["val_ppl"] == pytest.approx(torch.tensor(evals[0]["val_loss"]).exp().item(), rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps])
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [3, 6]
    assert "train/mfu_megatron" in acc.Tags()["scalars"]

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step6"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step4", "global_step6"]  # keep_last
    meta = json.loads((ckpts / "global_step6" / "megalm.json").read_text())
    assert meta["parallel"] == {"tensor": 2, "pipeline": 1, "data": 1, "context": 1, "expert": 1} and meta["step"] == 6
    assert meta["consumed_samples"] == 24 and meta["tokenizer"]["type"] == "byte"
    saved = yaml.safe_load((ckpts / "global_step6" / "config.yaml").read_text())
    assert saved == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["parallel"]["tensor"] == 2
    assert sorted(p.name for p in (ckpts / "global_step6").glob("rng_state_rank*.pt")) == [
        "rng_state_rank0.pt", "rng_state_rank1.pt"]


def test_zero_offload_matches_plain_zero2(byte_shards, tmp_path):
    def run(name, *extra):
        r = subprocess.run([sys.executable, "-m", "megalm.train", "--config", TINY,
                            f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={tmp_path / name}",
                            "train.steps=4", "zero.stage=2", "train.precision=fp32", "logging.tensorboard=false",
                            "train.eval_interval=0", "checkpoint.save_at_end=false", *extra],
                           env=train_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return step_losses(tmp_path / name)

    assert run("offload", "zero.offload_optimizer=true") == pytest.approx(run("plain"), rel=1e-6)


def test_user_errors_at_start_are_one_line(byte_shards, tmp_path):
    cases = [
        (["data.train_prefixes=[/nonexistent/prefix]"], "/nonexistent/prefix"),
        (["train.precision=fp16"], "fp16 needs a CUDA device"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.vocab_size=100"], "set model.vocab_size=257"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=4", "model.moe_top_k=5"],
         "model.moe_top_k (5) must be in 1..model.moe_num_experts (4)"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=4", "model.moe_dense_layers=[0,7]"],
         "model.moe_dense_layers [7] outside the model's blocks 0..1"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=4"],
         "LlamaForCausalLM cannot hold model.moe_num_experts=4: set model.family=mixtral"),
        # expert parallelism (one process here; tests/training/test_expert_parallel.py runs it)
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=6", "model.family=none", "parallel.expert=4"],
         "model.moe_num_experts (6) must divide by parallel.expert (4)"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=4", "model.family=none", "parallel.expert=2"],
         "parallel.expert (2) must divide data x context (1 x 1 = 1)"),
        ([f"data.train_prefixes=[{byte_shards}]", "model.moe_num_experts=4", "model.family=none", "parallel.expert=2",
          "zero.stage=3"], "parallel.expert=2 with zero.stage=3 is not supported"),
        ([f"data.train_prefixes=[{byte_shards}]", "parallel.expert=2"],
         "parallel.expert=2 needs a mixture of experts (model.moe_num_experts > 0)"),
        # the mixture (tests/training/test_mixture.py runs it)
        ([f"data.train_prefixes=[{byte_shards}]", f"data.mixture_schedule=[[2,[[1,{byte_shards}-gone]]]]"],
         f"{byte_shards}-gone.idx: no such file"),
        # Muon (tests/training/test_muon.py runs it)
        ([f"data.train_prefixes=[{byte_shards}]", "optimizer.muon_ns_steps=3"],
         "optimizer.muon_ns_steps is a Muon key but optimizer.name is adamw"),
        ([f"data.train_prefixes=[{byte_shards}]", "optimizer.name=muon", "zero.stage=0", "optimizer.muon_ns_steps=0"],
         "optimizer.muon_ns_steps must be at least 1, got 0"),
        ([f"data.train_prefixes=[{byte_shards}]", "optimizer.name=muon", "zero.stage=3"],
         "optimizer.name=muon with zero.stage=3 is not supported"),
    ]
    for overrides, message in cases:
        if "fp16" in message and torch.cuda.is_available():
            continue
        r = subprocess.run([sys.executable, "-m", "megalm.train", "--config", TINY, f"train.run_dir={tmp_path}",
                            *([f"data.train_prefixes=[{byte_shards}]"] if len(overrides) == 1 and "prefix" not in overrides[0] else []),
                            *overrides], env=train_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (overrides, r.stderr[-2000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (overrides, last)
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_compiled_tp2_sequence_parallel_matches_eager(byte_shards, tmp_path):
    # train.compile: dynamo traces the tensor-parallel mappings and the fused chunked loss
    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile-{compiled}"
        overrides = [f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={run_dir}", "parallel.tensor=2",
                     "parallel.sequence_parallel=true", "train.steps=3", "train.eval_interval=0",
                     "checkpoint.save_at_end=false", "train.precision=fp32", "model.loss_chunk_tokens=100",
                     "logging.tensorboard=false", f"train.compile={str(compiled).lower()}"]
        run_distributed_test(train_rank, 2, args=(TINY, overrides), env={"DS_ACCELERATOR": "cpu"}, timeout=600)
        losses[compiled] = step_losses(run_dir)
    assert sorted(losses[True]) == [1, 2, 3]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-5), (step, losses)
