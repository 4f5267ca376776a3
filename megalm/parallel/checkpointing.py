"""Activation checkpointing that replays the tensor-parallel dropout stream.

A checkpointed block keeps only its input; the backward pass runs its forward again to rebuild
the activations. torch's non-reentrant checkpoint replays the default generators, so dropout
outside tensor-parallel regions draws the same masks the second time. Dropout inside a region
draws from the TensorParallelRNG tracker instead, which torch does not know about: its state is
saved before the first forward, restored for the recomputation, and set back afterwards so later
forwards continue where they left off (Megatron's CheckpointFunction does the same with its
CudaRNGStatesTracker).

Applied after the model is built, as torchtitan applies its wrappers: the block only exposes a
`recompute` slot (None: run normally), so parameter names do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalm.parallel.random import TensorParallelRNG

_RECOMPUTING = [0]


def recomputing() -> bool:
    """Whether the forward now running rebuilds activations in the backward pass (statistics a
    module records, such as a MoE layer's token counts, must not be counted twice)."""
    return _RECOMPUTING[0] > 0


class RecomputeInBackward:
    """recompute(forward, x, *args): forward(x, *args) under torch's non-reentrant checkpoint,
    with the tensor-parallel tracker replayed for the recomputation."""

    def __init__(self, rng: TensorParallelRNG) -> None:
        self.rng = rng

    def __call__(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
        before = self.rng.get_states()
        calls = [0]

        def run(x: torch.Tensor, *args: Any) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return forward(x, *args)
            after = self.rng.get_states()
            self.rng.set_states(before)
            _RECOMPUTING[0] += 1
            try:
                return forward(x, *args)
            finally:
                _RECOMPUTING[0] -= 1
                self.rng.set_states(after)

        return checkpoint(run, x, *args, use_reentrant=False)


def apply_activation_checkpointing(blocks: Iterable[nn.Module], rng: TensorParallelRNG) -> None:
    """Recompute each of `blocks` (modules with a `recompute` slot) in the backward pass."""
    recompute = RecomputeInBackward(rng)
    for block in blocks:
        if not hasattr(block, "recompute"):
            raise TypeError(f"{type(block).__name__} has no recompute slot")
        block.recompute = recompute
