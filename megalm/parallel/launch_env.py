"""Discover rank, world size and rendezvous address from whichever launcher started us.

Precedence (first match wins):
  1. torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
  2. OpenMPI (mpirun/mpiexec): OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}.
  3. PMIx (e.g. `srun --mpi=pmix`, OpenMPI 5): PMIX_RANK, size from the launcher's other variables.
  4. SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR = first host of
     SLURM_JOB_NODELIST; MASTER_PORT derived from the job id.
  5. Nothing set: a single process.
MPI comes before SLURM because under `mpirun` inside an allocation every rank also sees the
SLURM_* of the per-node launcher step, which describe that step, not the world. DeepSpeed's own
MPI discovery is never used: it takes MASTER_ADDR from `hostname -I`, a non-loopback address.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from megalm.errors import MegalmError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """Which launcher's variables were read: torchrun, openmpi, pmix, slurm or single."""

    def export(self, environ: dict[str, str] | None = None) -> None:
        """Write the torch.distributed variables (RANK, ...) so that every library agrees with us."""
        env = os.environ if environ is None else environ
        env.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise MegalmError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _first_int(env: Mapping[str, str], keys: tuple[str, ...], default: int | None = None) -> int:
    for key in keys:
        if key in env:
            return _int(env, key)
    if default is None:
        raise MegalmError(f"cannot tell the world size: none of {', '.join(keys)} is set")
    return default


def _port(env: Mapping[str, str]) -> int:
    return _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT


def slurm_port(job_id: str) -> int:
    """A rendezvous port derived from the job id, so that jobs sharing a node do not collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits[-6:]) % 20000


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,7],login1' -> gpu01 gpu02 gpu03 gpu7 login1."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def discover(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's environment (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            _int(env, "RANK"), _int(env, "WORLD_SIZE"), int(env.get("LOCAL_RANK", "0")),
            addr, _port(env), "torchrun",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return _mpi_env(env, "openmpi", _int(env, "OMPI_COMM_WORLD_RANK"))
    if "PMIX_RANK" in env:
        return _mpi_env(env, "pmix", _int(env, "PMIX_RANK"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm_env(env)
    return LaunchEnv(0, 1, 0, addr, _port(env), "single")


def _mpi_env(env: Mapping[str, str], launcher: str, rank: int) -> LaunchEnv:
    world = _first_int(env, ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS", "WORLD_SIZE"))
    local_rank = _first_int(
        env, ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"), 0
    )
    local_size = _first_int(env, ("OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"), world)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in env:
        addr = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
    elif local_size >= world:
        addr = "127.0.0.1"  # every rank on this node
    else:
        raise MegalmError(
            f"{launcher}: ranks span several nodes but MASTER_ADDR is not set; "
            "export MASTER_ADDR=<first host> (mpirun -x MASTER_ADDR)"
        )
    return LaunchEnv(rank, world, local_rank, addr, _port(env), launcher)


def _slurm_env(env: Mapping[str, str]) -> LaunchEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    addr = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1")
    port = _port(env) if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID", "0"))
    return LaunchEnv(
        _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), int(env.get("SLURM_LOCALID", "0")),
        addr, port, "slurm",
    )
