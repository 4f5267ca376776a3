import pytest
import torch
import torch.distributed as dist

from megalm.testing.distributed import DistributedTestError, run_distributed_test


def _sum_ranks():
    x = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(x)
    return x.item()


def _fail_on_rank_1():
    if dist.get_rank() == 1:
        raise RuntimeError("boom from rank one")
    return 0


def _user_error_on_rank_1():
    from megalm.errors import MegalmError

    if dist.get_rank() == 1:
        raise MegalmError("converted shape (3,) != model shape (4,)")
    return 0


def _hang():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins
    else:
        import time

        time.sleep(60)


def test_returns_every_rank_value():
    assert run_distributed_test(_sum_ranks, world_size=2) == [3.0, 3.0]


def test_failing_rank_traceback_propagates():
    with pytest.raises(DistributedTestError, match="(?s)rank 1 of 2 failed.*boom from rank one"):
        run_distributed_test(_fail_on_rank_1, world_size=2)


def test_timeout_kills_ranks():
    with pytest.raises(TimeoutError, match="timed out"):
        run_distributed_test(_hang, world_size=2, timeout=8)


def test_a_users_mistake_on_a_rank_is_one_line_for_the_cli():
    # the checkpoint writer runs on these ranks in production: its MegalmErrors reach the CLI as one line
    from megalm.errors import MegalmError

    with pytest.raises(MegalmError) as e:
        run_distributed_test(_user_error_on_rank_1, world_size=2)
    assert str(e.value) == "converted shape (3,) != model shape (4,)"
    assert isinstance(e.value, DistributedTestError)  # and still the harness's error, traceback attached
    assert "rank 1 of 2" in "".join(e.value.__notes__) and "_user_error_on_rank_1" in "".join(e.value.__notes__)


def _print_rank():
    import sys

    # one write per line (two ranks share the file); not flushed: the harness flushes before it reports
    sys.stdout.write(f"stdout of rank {dist.get_rank()}\n")
    sys.stderr.write(f"stderr of rank {dist.get_rank()}\n")


def test_what_a_rank_prints_reaches_the_callers_current_output(capfd):
    # the ranks fork from a server started by an earlier call (the first test of the suite, under
    # another capture): they must write to the files descriptors 1 and 2 name now, as pytest's capfd
    run_distributed_test(_sum_ranks, world_size=2)
    capfd.readouterr()
    run_distributed_test(_print_rank, world_size=2)
    captured = capfd.readouterr()
    assert sorted(captured.out.splitlines()) == ["stdout of rank 0", "stdout of rank 1"]
    assert "stderr of rank 0" in captured.err and "stderr of rank 1" in captured.err
