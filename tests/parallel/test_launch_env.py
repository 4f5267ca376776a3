import pytest

from megalm.errors import MegalmError
from megalm.parallel.launch_env import LaunchEnv, discover, expand_hostlist, slurm_port


def test_single_process_when_nothing_set():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert env.master_addr == "127.0.0.1"


def test_torchrun_and_deepspeed_launcher():
    env = discover(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    )
    assert env == LaunchEnv(3, 8, 1, "node0", 1234, "torchrun")


def test_openmpi():
    env = discover(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_ADDR": "10.1.1.1",
            "MASTER_PORT": "29590",
        }
    )
    assert env == LaunchEnv(2, 4, 0, "10.1.1.1", 29590, "openmpi")


def test_openmpi_single_node_defaults_to_loopback():
    env = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert env.master_addr == "127.0.0.1" and env.world_size == 2


def test_openmpi_multi_node_needs_master_addr():
    with pytest.raises(MegalmError, match="MASTER_ADDR"):
        discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_mpirun_inside_slurm_allocation_uses_mpi_world():
    # every rank of mpirun also sees the per-node launcher step's SLURM_* (procid 0 of 1 task):
    # reading SLURM first would form several worlds of one.
    env = discover(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "SLURM_LOCALID": "0",
            "SLURM_JOB_NODELIST": "ci-node[1-2]",
            "SLURM_JOB_ID": "77",
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "openmpi")
    assert env.master_addr == "ci-node1"


def test_pmix_under_srun():
    env = discover(
        {"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "a1"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher, env.master_addr) == (1, 2, 1, "pmix", "a1")


def test_slurm_srun():
    env = discover(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[003-006]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert env == LaunchEnv(5, 8, 1, "gpu003", slurm_port("123456"), "slurm")
    assert 20000 <= env.master_port < 40000


def test_slurm_master_overrides():
    env = discover(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "x", "MASTER_PORT": "5"}
    )
    assert (env.master_addr, env.master_port) == ("x", 5)


def test_torchrun_variables_win_over_slurm():
    # torchrun inside an allocation: RANK/WORLD_SIZE describe the real world
    env = discover({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "torchrun")


def test_bad_integer_is_user_error():
    with pytest.raises(MegalmError, match="RANK"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("ci-node[1-2]", ["ci-node1", "ci-node2"]),
        ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_export_sets_torch_variables():
    env = {}
    LaunchEnv(1, 2, 1, "h", 7, "slurm").export(env)
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"}
