"""A real SLURM controller with two fake nodes (ci-node1, ci-node2) and munge on localhost."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """Bring the cluster up once per session; always tear it down. Yields the env for sbatch."""
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.fail("the cluster tests need root and Debian's slurmctld/slurmd/munge (.ci/run installs them)")
    root = tmp_path_factory.mktemp("slurm")
    # CPUs per fake node given explicitly: `nproc` (the script's default) honours OMP_NUM_THREADS=1
    env = dict(os.environ, SLURM_CI_ROOT=str(root), SLURM_CI_MPI="0", SLURM_CI_CPUS=str(max(2, os.cpu_count() or 2)))
    script = str(HERE / "slurm_ci.sh")
    up = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield dict(env, SLURM_CONF=str(root / "etc" / "slurm.conf"))
    finally:
        subprocess.run(["bash", script, "down"], env=env, capture_output=True, timeout=120)
