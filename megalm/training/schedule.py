"""Learning-rate schedules: linear warmup, then cosine, constant, or warmup-stable-decay (WSD).

`lr_at(step)` is the learning rate of the optimizer step with 0-based index `step`:
  warmup    lr * (step + 1) / warmup_steps                     for step < warmup_steps
  cosine    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,    p = (step - warmup) / decay_steps
  constant  lr
  wsd       lr until steps - decay_steps, then linear to min_lr at the last step
(p and the WSD ramp are clamped to [0, 1]: after the decay the rate stays at min_lr).
"""

from __future__ import annotations

import math

import torch

from megalm.config import OptimizerConfig, ScheduleConfig


class LRSchedule:
    """A picklable callable, so DeepSpeed checkpoints it with the LambdaLR it drives."""

    def __init__(self, sched: ScheduleConfig, optim: OptimizerConfig, total_steps: int) -> None:
        assert sched.decay_steps is not None, "validate the config first"
        self.kind = sched.kind
        self.warmup = sched.warmup_steps
        self.decay = sched.decay_steps
        self.total = total_steps
        self.lr, self.min_lr = optim.lr, optim.min_lr

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            p = min(1.0, (step - self.warmup) / max(1, self.decay))
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        decay_start = self.total - self.decay  # wsd
        if step < decay_start:
            return self.lr
        p = min(1.0, (step - decay_start + 1) / max(1, self.decay))
        return self.lr + (self.min_lr - self.lr) * p

    def __call__(self, step: int) -> float:
        """LambdaLR's multiplier of the base (peak) learning rate."""
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: ScheduleConfig, optim: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(sched, optim, total_steps))
