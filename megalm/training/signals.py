"""Preemption: SIGTERM and SIGUSR1 (SLURM's `--signal=USR1@120`) ask for a save at the next step.

The handler only sets a flag. The loop asks `should_stop()` at each step boundary; the answer is
all-reduced so every rank agrees even when the signal reached only some of them.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from megalm.parallel.groups import communication_device


class PreemptionFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective when distributed: true on every rank if any rank received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=communication_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
