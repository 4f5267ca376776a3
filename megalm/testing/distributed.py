"""The distributed test harness: megalm.parallel.spawn under the names the tests use.

    results = run_distributed_test(check, world_size=4, args=(x,))   # real gloo ranks on 127.0.0.1
"""

from megalm.parallel.spawn import RankError, free_port
from megalm.parallel.spawn import spawn as run_distributed_test

DistributedTestError = RankError
"""A rank failed (its traceback is in the message)."""

__all__ = ["DistributedTestError", "free_port", "run_distributed_test"]
