"""Stragglers: one slow rank (a throttled GPU, a busy node, a slow disk) slows every rank's step;
find which one.

Every rank times the part of each step that is its own work: fetching its micro batches and their
forward passes. The data-parallel reduction comes after, in the backward pass, so there a slow
rank is slow and the others are not (they wait for it later, inside a collective). Every
`logging.straggler_interval` steps the ranks all-gather their mean of that time per step; rank 0
logs the slowest rank, its node and its ratio to the median into metrics.jsonl and TensorBoard
(straggler_rank, straggler_ratio, straggler_seconds, median_seconds), and prints a warning line
when the ratio reaches `logging.straggler_ratio`:

    warning: straggler at steps 41-50: rank 1 on node-03 takes 2.31x the median for its data and
    forward passes (0.412 s vs 0.178 s per step)
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm.parallel.groups import communication_device


@dataclass
class StragglerMonitor:
    interval: int
    warn_ratio: float
    nodes: list[str]
    busy: float = 0.0
    steps: int = 0

    @classmethod
    def start(cls, interval: int, warn_ratio: float) -> StragglerMonitor:
        """Collective when interval > 0: learns every rank's node name once."""
        nodes = [socket.gethostname()]
        if interval > 0 and dist.get_world_size() > 1:
            nodes = [""] * dist.get_world_size()
            dist.all_gather_object(nodes, socket.gethostname())
        return cls(interval, warn_ratio, nodes)

    def add(self, seconds: float) -> None:
        """This rank's own work in one step (data and forward passes), in seconds."""
        self.busy += seconds
        self.steps += 1

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0 and self.steps > 0

    def report(self, step: int) -> tuple[dict[str, float], str | None]:
        """Collective: (scalars for the metrics, a warning line or None); resets the window."""
        mine = torch.tensor([self.busy / self.steps], dtype=torch.float64, device=communication_device())
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        times = [float(t) for t in every]
        first = step - self.steps + 1
        self.busy, self.steps = 0.0, 0
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        ratio = times[slowest] / median if median > 0 else 1.0
        scalars = {"straggler_rank": slowest, "straggler_ratio": ratio, "straggler_seconds": times[slowest],
                   "median_seconds": median}
        warning = None
        if ratio >= self.warn_ratio and len(times) > 1:
            warning = (f"warning: straggler at steps {first}-{step}: rank {slowest} on {self.nodes[slowest]} takes "
                       f"{ratio:.2f}x the median for its data and forward passes ({times[slowest]:.3f} s vs "
                       f"{median:.3f} s per step)")
        return scalars, warning
