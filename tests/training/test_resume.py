"""Exact resume after kill -9, resume with another data-parallel size, preemption by signal,
and the non-finite-loss guard: real `torchrun` launches of `python -m megalm.train`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megalm.testing.distributed import DistributedTestError, free_port, run_distributed_test
from megalm.testing.parity import train_rank
from megalm.testing.runs import REPO, TINY, assert_resumed, loss_steps, read_metrics, step_losses, train_env

# slow steps (32 micro-batches per step on 2 ranks) so a signal or a kill lands mid-run
SLOW = ["train.micro_batch_size=1", "train.global_batch_size=64", "train.eval_interval=0",
        "logging.tensorboard=false", "train.precision=fp32"]


def torchrun(run_dir: Path, prefix: str, *overrides: str, nproc: int = 2, env: dict | None = None,
             config: str = TINY) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megalm.train", "--config", config, f"data.train_prefixes=[{prefix}]",
           f"train.run_dir={run_dir}", *overrides]
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115
    return subprocess.Popen(cmd, env=train_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(metrics.parent)):
            return
        assert proc.poll() is None, f"training exited early: {(run_dir.parent / (run_dir.name + '.log')).read_text()[-3000:]}"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def job(proc: subprocess.Popen) -> list:
    """The torchrun agent and its worker processes."""
    agent = psutil.Process(proc.pid)
    return [agent, *agent.children(recursive=True)]


def kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun job, agent and workers, as a node failure would, and wait until none runs.

    torchrun starts each worker in a session of its own: killing the agent's process group leaves
    them training (and saving) beside whatever the test starts next.
    """
    procs = job(proc)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            while p.status() != psutil.STATUS_ZOMBIE:  # reaped or a zombie: it runs no more
                assert time.monotonic() < deadline, f"process {p.pid} survived SIGKILL"
                time.sleep(0.05)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> int:
    code = proc.wait(timeout=timeout)
    assert code == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    return code


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["parallel.tensor=2", "model.dropout=0.1"],
                                    ["parallel.context=2", "model.document_mask=true"],
                                    ["optimizer.name=muon", "zero.stage=1"]],
                         ids=["dp2", "tp2-dropout", "cp2-document-mask", "dp2-muon-zero1"])
def test_kill_9_then_resume_is_bit_identical(byte_shards, tmp_path, layout):
    # tp2-dropout: attention dropout draws from the tensor-parallel tracker, which the checkpoint keeps
    args = [*SLOW, "train.global_batch_size=32", "train.steps=12", "checkpoint.interval=6", *layout]
    straight = tmp_path / "straight"
    finish(torchrun(straight, byte_shards, *args), straight)

    killed = tmp_path / "killed"
    proc = torchrun(killed, byte_shards, *args)
    wait_for_step(killed, proc, 7)
    kill_9(proc)  # no clean exit, no final save
    assert (killed / "checkpoints" / "latest").read_text() == "global_step6"
    assert not (killed / "status.json").exists()
    before = len(loss_steps(killed))
    finish(torchrun(killed, byte_shards, *args), killed)  # checkpoint.load=auto resumes at 6

    assert_resumed(killed, before, 6, 12)  # not a replay from step 1
    a, b = step_losses(straight), step_losses(killed)
    assert sorted(b) == list(range(1, 13))
    assert [b[s] for s in range(7, 13)] == [a[s] for s in range(7, 13)]  # bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_resume_with_other_data_parallel_size_continues_the_stream(byte_shards, tmp_path, zero):
    # ZeRO-0 keeps the whole optimizer state per rank: the loss continues exactly. ZeRO-1
    # partitions it by data-parallel rank: the resume keeps weights, step, schedule and data
    # position with a fresh optimizer (checkpoint.reset_optimizer=true), so only the data stream
    # is checked for it.
    common = [f"data.train_prefixes=[{byte_shards}]", "train.global_batch_size=8", "train.micro_batch_size=2",
              "train.precision=fp32", "schedule.kind=constant",
              f"zero.stage={zero}", "logging.sample_ids=true", "logging.tensorboard=false",
              "train.eval_interval=0", "checkpoint.interval=0"]
    run_dir = tmp_path / "run"
    run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=6", f"train.run_dir={run_dir}"]),
                         env={"DS_ACCELERATOR": "cpu"})
    resume = [*common, "train.steps=12", f"train.run_dir={run_dir}"]
    if zero:
        with pytest.raises(DistributedTestError, match="set checkpoint.reset_optimizer=true"):
            run_distributed_test(train_rank, 4, args=(TINY, resume), env={"DS_ACCELERATOR": "cpu"})
        resume.append("checkpoint.reset_optimizer=true")
    run_distributed_test(train_rank, 4, args=(TINY, resume), env={"DS_ACCELERATOR": "cpu"})
    ids = [i for f in sorted((run_dir / "sample_ids").glob("rank*.jsonl"))
           for line in f.read_text().splitlines() for i in json.loads(line)]
    assert sorted(ids) == list(range(12 * 8))  # nothing repeated, nothing skipped
    if zero:
        return
    # and the losses continue as a straight single-layout run would (same samples per step)
    straight = tmp_path / "straight"
    run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=12", f"train.run_dir={straight}"]),
                         env={"DS_ACCELERATOR": "cpu"})
    a, b = step_losses(straight), step_losses(run_dir)
    assert max(abs(a[s] - b[s]) / a[s] for s in range(1, 13)) <= 1e-5


@pytest.mark.slow
def test_a_tensor_pipeline_or_zero_stage_change_is_refused_with_the_conversion(byte_shards, tmp_path):
    common = [f"data.train_prefixes=[{byte_shards}]", "train.global_batch_size=8", "train.precision=fp32",
              "logging.tensorboard=false", "train.eval_interval=0", f"train.run_dir={tmp_path}", "zero.stage=1"]
    run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=2"]), env={"DS_ACCELERATOR": "cpu"})
    convert = f"convert it: python tools/convert_checkpoint.py universal --checkpoint {tmp_path / 'checkpoints' / 'global_step2'}"
    for overrides, message in [(["parallel.tensor=2"], "the checkpoint was written at tensor 1 x pipeline 1, this run has 2 x 1"),
                               (["parallel.pipeline=2"], "the checkpoint was written at tensor 1 x pipeline 1, this run has 1 x 2"),
                               (["zero.stage=3"], "the checkpoint was written with ZeRO-1, this run has ZeRO-3")]:
        with pytest.raises(DistributedTestError) as refused:
            run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=4", *overrides]),
                                 env={"DS_ACCELERATOR": "cpu"})
        assert f"{message}: {convert}" in str(refused.value), str(refused.value)[-2000:]
    assert loss_steps(tmp_path) == [1, 2]  # nothing trained


@pytest.mark.slow
def test_zero1_on_one_data_parallel_rank_runs_as_zero0(byte_shards, tmp_path):
    # issue 22: ZeRO-1 over one rank partitions nothing and only copies (README, Performance): it runs
    # as ZeRO-0, the checkpoint says so, resumes as such, and another data-parallel size goes through
    # a universal checkpoint (ZeRO-0 and ZeRO-1 files differ)
    from megalm.convert.universal import convert_to_universal
    from megalm.training.checkpoint_meta import CheckpointMeta

    common = [f"data.train_prefixes=[{byte_shards}]", "train.global_batch_size=8", "train.precision=fp32",
              "logging.tensorboard=false", "train.eval_interval=0", f"train.run_dir={tmp_path}", "zero.stage=1"]
    run_distributed_test(train_rank, 1, args=(TINY, [*common, "train.steps=2"]), env={"DS_ACCELERATOR": "cpu"})
    meta = CheckpointMeta.read(tmp_path / "checkpoints" / "global_step2")
    assert meta.config.zero.stage == 1 and meta.zero_stage == 0
    # bf16 keeps ZeRO-1: DeepSpeed's bf16 ZeRO-0 would step the bf16 weights, with no fp32 masters
    bf16 = [*common[:-2], "train.precision=bf16", f"train.run_dir={tmp_path / 'bf16'}", "zero.stage=1", "train.steps=2"]
    run_distributed_test(train_rank, 1, args=(TINY, bf16), env={"DS_ACCELERATOR": "cpu"})
    assert CheckpointMeta.read(tmp_path / "bf16" / "checkpoints" / "global_step2").zero_stage == 1
    run_distributed_test(train_rank, 1, args=(TINY, [*common, "train.steps=3"]), env={"DS_ACCELERATOR": "cpu"})
    assert_resumed(tmp_path, 2, 2, 3)
    with pytest.raises(DistributedTestError) as refused:
        run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=5"]), env={"DS_ACCELERATOR": "cpu"})
    assert ("DeepSpeed files are ZeRO-0 (data x context parallel 1 x 1), this run's are ZeRO-1 (2 x 1"
            in str(refused.value)), str(refused.value)[-2000:]
    universal = convert_to_universal(tmp_path, tmp_path / "u")
    run_distributed_test(train_rank, 2, args=(TINY, [*common, "train.steps=5", f"checkpoint.load={universal.parent}"]),
                         env={"DS_ACCELERATOR": "cpu"})
    assert CheckpointMeta.read(tmp_path / "checkpoints" / "global_step5").zero_stage == 1
    assert_resumed(tmp_path, 3, 3, 5)


@pytest.mark.slow
def test_sigusr1_saves_at_next_step_and_exits_0(byte_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, byte_shards, *SLOW, "train.steps=200", "checkpoint.interval=0")
    wait_for_step(run_dir, proc, 3)
    workers = [p for p in job(proc)[1:] if "megalm.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGUSR1)  # one rank only: the stop decision is all-reduced
    finish(proc, run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 3 <= status["step"] < 200
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{status['step']}"
    # a resubmission resumes from there
    before = len(loss_steps(run_dir))
    proc = torchrun(run_dir, byte_shards, *SLOW, f"train.steps={status['step'] + 2}", "checkpoint.interval=0")
    finish(proc, run_dir)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert_resumed(run_dir, before, status["step"], status["step"] + 2)


def test_nonfinite_loss_skips_then_aborts(byte_shards, tmp_path):
    run_dir = tmp_path / "nan"
    r = subprocess.run(
        [sys.executable, "-m", "megalm.train", "--config", TINY, f"data.train_prefixes=[{byte_shards}]",
         f"train.run_dir={run_dir}", "optimizer.lr=1e25", "optimizer.min_lr=0", "optimizer.grad_clip=0",
         "schedule.warmup_steps=0", "train.max_nonfinite_steps=3", "zero.stage=0", "train.precision=fp32",
         "logging.tensorboard=false"],
        env=train_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: loss was not finite for 3 steps in a row")
    rows = [x for x in read_metrics(run_dir) if "loss" in x]
    assert rows[-1]["skipped_steps"] == 3 and rows[-1]["loss"] == "nan"
    # skipped updates leave the learning-rate schedule where it was
    assert rows[-1]["lr"] == rows[-2]["lr"]


@pytest.mark.slow
def test_a_stopped_rank_makes_the_others_exit_with_one_line_and_their_stacks(byte_shards, tmp_path):
    # the case: 2 ranks under torchrun, one SIGSTOPped mid-run; before, the job hung for good
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, byte_shards, *SLOW, "train.steps=200", "checkpoint.interval=0",
                    "parallel.collective_timeout_minutes=0.1")
    wait_for_step(run_dir, proc, 3)
    workers = [p for p in job(proc)[1:] if "megalm.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    live, stopped = workers
    os.kill(stopped.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:  # the live rank exits with its line; torchrun would then wait 30 s to SIGKILL the stopped one
        while live.is_running() and live.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - t0 < 150, "the live rank did not exit"
            time.sleep(0.1)
        exited = time.monotonic() - t0
    finally:
        kill_9(proc)
    # 6 s of collective timeout, plus the step that was under way and the exit (loose: CI is shared)
    assert exited < 60, f"the live rank took {exited:.0f} s to exit"
    log = (tmp_path / "run.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: step ")]
    assert errors, log[-3000:]
    assert "a collective timed out after 0.1 min during" in errors[0] and "stacks" in errors[0]
    assert ", in all_reduce called by" in errors[0] or ", in barrier called by" in errors[0], errors[0]
    live = [p for p in (run_dir / "stacks").glob("rank*.txt") if "Thread" in p.read_text()]
    assert live, "no rank dumped its stacks"
    assert any("megalm/training/loop.py" in p.read_text() for p in live)


SLOW_SECOND_SAVE = """import time
import torch

_save = torch.save


def _slow(obj, f, *args, **kwargs):  # the second checkpoint's files take long to write
    if "global_step10" in str(f):
        time.sleep(60)
    return _save(obj, f, *args, **kwargs)


torch.save = _slow
"""


@pytest.mark.slow
def test_kill_9_while_an_async_save_is_written_then_resume_is_bit_identical(byte_shards, tmp_path):
    args = [*SLOW, "train.steps=14", "checkpoint.interval=5", "checkpoint.async_save=true", "checkpoint.keep_last=0"]
    straight = tmp_path / "straight"
    finish(torchrun(straight, byte_shards, *args), straight)
    assert (straight / "checkpoints" / "latest").read_text() == "global_step14"

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SECOND_SAVE)  # imported by every python of the job
    killed = tmp_path / "killed"
    proc = torchrun(killed, byte_shards, *args, env={"PYTHONPATH": f"{hook}:{REPO}"})
    wait_for_step(killed, proc, 12)  # training went on past step 10 while its files were written
    kill_9(proc)
    root = killed / "checkpoints"
    assert (root / "latest").read_text() == "global_step5" and (root / "global_step10.saving").is_dir()
    blocked = [r["save_blocked_s"] for r in read_metrics(killed) if "save_blocked_s" in r]
    assert len(blocked) == 2 and blocked[1] < 30  # the slow save did not block training
    before = len(loss_steps(killed))
    finish(torchrun(killed, byte_shards, *args), killed)  # resumes from global_step5
    assert_resumed(killed, before, 5, 14)
    a, b = step_losses(straight), step_losses(killed)
    assert [b[s] for s in range(6, 15)] == [a[s] for s in range(6, 15)]  # bit-identical
