"""Real launches of python -m megalm.train: SLURM sbatch/srun (two fake nodes), mpirun, the
deepspeed launcher and torchrun, all on 127.0.0.1. Each asserts the world and ranks it saw."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megalm.testing.runs import REPO, step_losses, train_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RANK_LINE = re.compile(r"megalm rank (\d+)/(\d+) local (\d+) via (\w+) on ([^:\s]+):")
TRAIN = ["train.steps=6", "checkpoint.interval=3", "train.eval_interval=0", "logging.tensorboard=false",
         "train.precision=fp32"]


def ranks_seen(log: str) -> dict[int, tuple[int, int, str]]:
    """rank -> (world, local rank, launcher) from the start-up line every rank prints."""
    return {int(m[1]): (int(m[2]), int(m[3]), m[4]) for m in RANK_LINE.finditer(log)}


def sbatch(slurm: dict, run_dir: Path, sbatch_args: list[str], overrides: list[str]) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={run_dir}.slurm-%j.log", *sbatch_args,
         "launchers/slurm/train.sbatch", *overrides],
        cwd=REPO, env=train_env(**slurm, RUN_DIR=str(run_dir)), capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(slurm: dict, job: str) -> tuple[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", line)
    code = re.search(r" ExitCode=([\d:]+)", line)
    return (state[1] if state else ""), (code[1] if code else "")


def wait_job(slurm: dict, job: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, code = job_state(slurm, job)
        if state not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"):
            return f"{state} {code}"
        time.sleep(0.5)
    raise TimeoutError(f"job {job} still {job_state(slurm, job)}")


def job_log(run_dir: Path, job: str) -> str:
    return Path(f"{run_dir}.slurm-{job}.log").read_text()


@pytest.mark.parametrize("nodes, tasks", [(2, 1), (1, 2)])
def test_sbatch_trains_checkpoints_and_resumes(slurm, byte_shards, tmp_path, nodes, tasks):
    run_dir = tmp_path / f"run{nodes}x{tasks}"
    layout = [f"--nodes={nodes}", f"--ntasks-per-node={tasks}"]
    train = [f"data.train_prefixes=[{byte_shards}]", *TRAIN]
    job = sbatch(slurm, run_dir, layout, train)
    assert wait_job(slurm, job) == "COMPLETED 0:0", job_log(run_dir, job)
    log = job_log(run_dir, job)
    seen = ranks_seen(log)
    assert sorted(seen) == [0, 1] and all(world == 2 and how == "slurm" for world, _, how in seen.values()), log
    assert {host for *_, host in RANK_LINE.findall(log)} == {f"ci-node{i + 1}" for i in range(nodes)}
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step6"
    # a second submission with more steps resumes from that checkpoint
    job = sbatch(slurm, run_dir, layout, [*train, "train.steps=9"])
    assert wait_job(slurm, job) == "COMPLETED 0:0", job_log(run_dir, job)
    assert "resumed from" in job_log(run_dir, job) and "step 6," in job_log(run_dir, job)
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step9"
    assert sorted(step_losses(run_dir)) == list(range(1, 10))


def test_scancel_usr1_checkpoints_and_requeued_job_resumes(slurm, byte_shards, tmp_path):
    run_dir = tmp_path / "preempt"
    job = sbatch(slurm, run_dir, ["--nodes=1", "--ntasks-per-node=2"], [
        f"data.train_prefixes=[{byte_shards}]", "train.steps=400", "train.micro_batch_size=1",
        "train.global_batch_size=32", "checkpoint.interval=0", "train.eval_interval=0",
        "logging.tensorboard=false", "train.precision=fp32"])
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or len(step_losses(run_dir)) < 3:
        assert time.monotonic() < deadline, job_log(run_dir, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    deadline = time.monotonic() + 240
    released, last_release, pending_since = 0, 0.0, None
    while "resumed from" not in job_log(run_dir, job):  # the requeued job appends to the same log
        show = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"{job_log(run_dir, job)}\n{show}"
        # requeued: SLURM holds it ~2 min. Released no sooner than 3 s after it is pending: started within the
        # second its old credential was revoked, slurmd refuses it ("Job credential revoked") and the job
        # ends; released again while it stays pending
        if job_state(slurm, job)[0] == "PENDING":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 3 and time.monotonic() - last_release > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
                released, last_release = released + 1, time.monotonic()
        time.sleep(0.5)
    assert released
    log = job_log(run_dir, job)
    subprocess.run(["scancel", job], env=slurm)
    assert "preempted: checkpoint saved; requeueing job" in log
    resumed = re.search(r"resumed from \S+global_step(\d+): step (\d+)", log)
    assert resumed and 3 <= int(resumed[2]) < 400


def test_sbatch_deepspeed_launcher_per_node(slurm, byte_shards, tmp_path):
    run_dir = tmp_path / "ds"
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={run_dir}.slurm-%j.log", "--nodes=2",
         "launchers/slurm/train_deepspeed.sbatch", f"data.train_prefixes=[{byte_shards}]", *TRAIN],
        cwd=REPO, env=train_env(**slurm, RUN_DIR=str(run_dir), GPUS_PER_NODE="1"),
        capture_output=True, text=True, check=True,
    )
    job = out.stdout.strip()
    assert wait_job(slurm, job) == "COMPLETED 0:0", job_log(run_dir, job)
    log = job_log(run_dir, job)
    assert ranks_seen(log) == {0: (2, 0, "torchrun"), 1: (2, 0, "torchrun")}, log
    assert {host for *_, host in RANK_LINE.findall(log)} == {"ci-node1", "ci-node2"}
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step6"


def test_mpirun_two_ranks(byte_shards, tmp_path):
    run_dir = tmp_path / "mpi"
    r = subprocess.run(
        ["bash", "launchers/mpi/train.sh", f"data.train_prefixes=[{byte_shards}]", f"train.run_dir={run_dir}", *TRAIN],
        cwd=REPO, env=train_env(NP="2"), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = ranks_seen(r.stdout)
    assert seen == {0: (2, 0, "openmpi"), 1: (2, 1, "openmpi")}
    assert json.loads((run_dir / "status.json").read_text())["step"] == 6


def test_mpi4py_agrees_with_discovery():
    code = ("from mpi4py import MPI; from megalm.parallel.launch_env import discover; e = discover(); "
            "c = MPI.COMM_WORLD; assert (e.rank, e.world_size) == (c.Get_rank(), c.Get_size()), e; "
            "import sys; sys.stdout.write(f'ok {e.rank} {e.world_size}\\n')")  # one write: ranks share a pty
    r = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "--tag-output", "-np", "2", "--mca", "btl", "self,vader",
         "--mca", "oob_tcp_if_include", "lo", "python", "-c", code],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # --tag-output: mpirun prefixes each rank's lines ([1,R]<stdout>:) instead of interleaving them
    assert sorted(re.findall(r"ok \d \d$", r.stdout, re.M)) == ["ok 0 2", "ok 1 2"], r.stdout + r.stderr


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_deepspeed_launcher_and_torchrun(byte_shards, tmp_path, launcher):
    run_dir = tmp_path / launcher
    r = subprocess.run(
        ["bash", f"launchers/{launcher}/train.sh", f"data.train_prefixes=[{byte_shards}]",
         f"train.run_dir={run_dir}", *TRAIN],
        cwd=REPO, env=train_env(NUM_GPUS="2", MASTER_PORT=str(29500 + hash(launcher) % 1000)),
        capture_output=True, text=True, timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    seen = ranks_seen(out)
    assert seen == {0: (2, 0, "torchrun"), 1: (2, 1, "torchrun")}, out[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step6"
