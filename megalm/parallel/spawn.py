"""Run a function on N real gloo ranks (spawned processes on 127.0.0.1) and collect the results.

    def work(arg): ...                  # module-level, so it pickles
    results = spawn(work, world_size=4, args=(arg,))

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in its environment and an
initialised default process group. A rank that raises makes the call raise RankError with that
rank's traceback; when it was a MegalmError (a user's mistake, e.g. a converted shape that does not
fit) the error is a RankUserError, also a MegalmError whose message is that one line (the traceback
is attached as a note), so a CLI prints it as one line. A hang raises TimeoutError after `timeout`
seconds and kills every rank.

Ranks are forked from a server process that has imported torch, DeepSpeed and the trainer once
(multiprocessing's forkserver, started at the first call): a rank starts in a tenth of a second
instead of re-importing them (seconds each). Each rank takes the caller's current environment and
working directory, as a spawned process would; only the preloaded modules saw the environment of the
first call (DS_ACCELERATOR, for one, is read when DeepSpeed is imported). Its standard output and
error are the caller's at the time of the call (passed as file descriptors), not the server's: what
a rank prints lands where the caller's own prints do now (pytest's capfd, a redirected log).

The checkpoint writer runs on it in production; megalm.testing.distributed re-exports it as the
test harness (`run_distributed_test`).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalm.errors import MegalmError


class RankError(RuntimeError):
    """A rank failed; the message holds its traceback."""


class RankUserError(RankError, MegalmError):
    """A rank raised a MegalmError: its one-line message, the rank's traceback as a note."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["megalm.training.loop"]  # torch, DeepSpeed and the trainer: what a rank spends its start on


class CallerStdio:
    """The caller's stdout and stderr, sent to a forked rank as file descriptors.

    A forkserver's children inherit the server's descriptors 1 and 2, fixed when it started (during
    whichever call came first); pickling this object while the process starts duplicates the
    caller's current ones into the rank, where `attach` puts them in place.
    """

    def __reduce__(self) -> tuple:
        return (_AttachedFds, ((reduction.DupFd(1), reduction.DupFd(2)),))


class _AttachedFds:
    def __init__(self, handles: tuple) -> None:
        self.handles = handles

    def attach(self) -> None:
        for target, handle in zip((1, 2), self.handles, strict=True):
            fd = handle.detach()
            os.dup2(fd, target)
            os.close(fd)


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict, cwd: str, results: Any,
    stdio: _AttachedFds
) -> None:
    stdio.attach()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits
        outcome = (rank, "ok", pickle.dumps(fn(*args)))
    except MegalmError as e:
        outcome = (rank, "user", (str(e), traceback.format_exc()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        outcome = (rank, "error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # what the rank printed is in the caller's files before the caller has the result
    sys.stdout.flush()
    sys.stderr.flush()
    results.put(outcome)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run fn(*args) on `world_size` gloo ranks; return each rank's return value, by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, env, os.getcwd(), results, CallerStdio()),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                _check_alive(procs, values, deadline, timeout)
                continue
            if status == "user":
                message, trace = value
                error = RankUserError(message)
                error.add_note(f"rank {rank} of {world_size}:\n{trace}")
                raise error
            if status == "error":
                raise RankError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(values) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]


def _check_alive(procs: list, values: dict[int, Any], deadline: float, timeout: float) -> None:
    """Raise if a rank died without reporting (e.g. a segfault) or the deadline passed."""
    for rank, p in enumerate(procs):
        if rank not in values and not p.is_alive() and p.exitcode not in (0, None):
            raise RankError(f"rank {rank} died with exit code {p.exitcode}")
    if time.monotonic() > deadline:
        raise TimeoutError(
            f"{len(procs)} spawned ranks timed out after {timeout:.0f}s; ranks that finished: {sorted(values)}"
        )
