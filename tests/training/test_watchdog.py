"""The hang watchdog's line: step, phase and the collective, from a backend's timeout error (the
end-to-end case, a SIGSTOPped rank under torchrun, is in test_resume.py)."""

from __future__ import annotations

from megalm.errors import MegalmError
from megalm.training.watchdog import StepWatchdog, collective_of


def _raise_through(*frames: tuple[str, str]) -> RuntimeError:
    """A RuntimeError whose traceback passes through functions named and filed as `frames` (outermost first)."""
    def innermost() -> None:
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv")

    call = innermost
    for file, name in reversed(frames):
        call.__code__ = call.__code__.replace(co_filename=file, co_name=name)
        call = (lambda inner: lambda: inner())(call)
    try:
        call()
    except RuntimeError as e:
        return e
    raise AssertionError("did not raise")


def test_a_collective_timeout_becomes_one_line_naming_step_phase_and_caller(tmp_path):
    error = _raise_through(("/v/site-packages/deepspeed/runtime/zero/stage_1_and_2.py", "allreduce_bucket"),
                           ("/v/site-packages/deepspeed/comm/torch.py", "all_reduce"),
                           ("/v/site-packages/torch/distributed/distributed_c10d.py", "all_reduce"))
    assert collective_of(error) == ", in all_reduce called by deepspeed/runtime/zero/stage_1_and_2.py allreduce_bucket"
    dog = StepWatchdog(tmp_path, 3, timeout_minutes=0.5)
    try:
        dog.arm(7)
        dog.phase = "the backward pass"
        line = dog.explain(error)
        other = RuntimeError("CUDA out of memory")
        assert dog.explain(other) is other  # anything else passes through unchanged
    finally:
        dog.close()
    assert isinstance(line, MegalmError)
    assert str(line).startswith("step 7: a collective timed out after 0.5 min during the backward pass, in all_reduce "
                                "called by deepspeed/runtime/zero/stage_1_and_2.py allreduce_bucket (another rank "
                                "stopped or is far behind; [gloo")
    assert str(line).endswith(f"Python stack is in {tmp_path}/stacks/rank*.txt")
    assert (tmp_path / "stacks" / "rank3.txt").read_text().startswith("--- step 7:")


def test_the_stacks_file_keeps_dumps_and_only_the_current_step_header(tmp_path):
    import os
    import signal

    dog = StepWatchdog(tmp_path, 0, timeout_minutes=10)
    try:
        for step in range(1, 1001):  # steps that end in time leave nothing behind
            dog.arm(step)
            dog.disarm()
        dog.arm(1001)
        os.kill(os.getpid(), signal.SIGUSR2)  # a dump by hand, as for a slow job
        dog.disarm()
        dog.arm(1002)
    finally:
        dog.close()
    text = (tmp_path / "stacks" / "rank0.txt").read_text()
    headers = [line for line in text.splitlines() if line.startswith("--- step")]
    assert [h.split(":")[0] for h in headers] == ["--- step 1001", "--- step 1002"]
    assert "test_the_stacks_file_keeps_dumps" in text.split("--- step 1002")[0]  # the dump, under its step
