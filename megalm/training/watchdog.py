"""Hangs that explain themselves: every rank's Python stack on disk, and one line naming the step.

A rank that stops (a dead node, a stuck kernel, SIGSTOP) leaves the others waiting in a collective.
Every process group times out after parallel.collective_timeout_minutes (megalm.parallel.groups,
DeepSpeed's groups included), so the waiting ranks get an error from the backend; the watchdog
turns it into one line naming the step and the phase the rank was in:

    error: step 5: a collective timed out after 0.1 min during the backward pass (another rank
    stopped or is far behind); each live rank's Python stack is in RUN_DIR/stacks/rank{R}.txt

Before the timeout fires, faulthandler has written every thread's stack of the rank into
RUN_DIR/stacks/rank{R}.txt (armed for 0.9 x the timeout at each step, cancelled when the step ends),
so the file shows where each live rank waited. `kill -USR2 PID` dumps a rank's stacks there at any
time, for a job that is slow rather than stuck. The file keeps every dump under the header of its
step, and only the current step's header beside them: a step that ends without a dump takes its
header back, so a run of a million steps does not leave a million lines per rank.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import traceback
from pathlib import Path
from typing import IO

from megalm.errors import MegalmError

TIMEOUT_WORDS = ("timed out", "timeout")


class StepWatchdog:
    """arm(step) at the start of each step, `phase` as the step proceeds, disarm() at its end."""

    def __init__(self, run_dir: Path, rank: int, timeout_minutes: float) -> None:
        self.timeout_minutes, self.step, self.phase = timeout_minutes, 0, "start-up"
        self.path = Path(run_dir) / "stacks" / f"rank{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for faulthandler
        self.header: tuple[int, int] | None = None  # where the last step header starts and ends
        faulthandler.register(signal.SIGUSR2, file=self.file, all_threads=True)

    def arm(self, step: int) -> None:
        self.step, self.phase = step, "the step"
        if self.file is None:
            return
        size = os.fstat(self.file.fileno()).st_size  # faulthandler writes to the descriptor itself
        if self.header is not None and self.header[1] == size:  # nothing was dumped under it
            self.file.truncate(self.header[0])
            size = self.header[0]
        self.file.write(f"--- step {step}: stacks if it takes over {0.9 * self.timeout_minutes:g} min ---\n")
        self.file.flush()
        self.header = (size, os.fstat(self.file.fileno()).st_size)
        faulthandler.dump_traceback_later(0.9 * self.timeout_minutes * 60, file=self.file)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        faulthandler.unregister(signal.SIGUSR2)
        if self.file is not None:
            self.file.close()
            self.file = None

    def explain(self, error: BaseException) -> BaseException:
        """A backend's collective timeout as one MegalmError naming the step and phase; any other
        error as it is."""
        text = str(error)
        if not any(word in text.lower() for word in TIMEOUT_WORDS):
            return error
        first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
        return MegalmError(
            f"step {self.step}: a collective timed out after {self.timeout_minutes:g} min during {self.phase}"
            f"{collective_of(error)} (another rank stopped or is far behind; {first}); each live rank's "
            f"Python stack is in {self.path.parent}/rank*.txt")


def collective_of(error: BaseException) -> str:
    """', in all_reduce called by deepspeed/runtime/zero/stage_1_and_2.py allreduce_bucket': the
    torch.distributed call the error came from and its caller outside torch, from the traceback."""
    frames = [(f.filename, f.name) for f in traceback.extract_tb(error.__traceback__)]
    calls = [i for i, (file, _) in enumerate(frames) if file.endswith("distributed_c10d.py")]
    if not calls:
        return ""
    name = frames[calls[-1]][1]
    callers = [(file, func) for file, func in frames[:calls[0]]
               if "/torch/" not in file and "/deepspeed/comm/" not in file]  # past the wrappers
    if not callers:
        return f", in {name}"
    file, func = callers[-1]
    short = file.split("site-packages/")[-1]
    return f", in {name} called by {short} {func}"
