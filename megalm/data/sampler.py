"""Resumable distributed batch sampler keyed by the global consumed-sample count (Megatron's).

Each micro step the data-parallel ranks together take the next `micro_batch_size * data_size`
samples; rank r takes the contiguous slice [r * micro, (r + 1) * micro) of them. Where training
resumes depends only on `consumed_samples` (which the trainer stores in its checkpoint), so a run can
resume with a different data-parallel size and still see every sample exactly once, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from megalm.data.packing import Collate
from megalm.errors import MegalmError


class MegatronPretrainingSampler:
    """Yields, per micro step, this rank's list of global sample indices. Incomplete last steps are dropped.

    The sampler does not know what was trained (a DataLoader reads ahead); the trainer counts
    consumed samples (global batch size per optimizer step) and passes them in on resume.
    """

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_rank: int, data_size: int
    ) -> None:
        if total_samples <= 0 or micro_batch_size <= 0 or data_size <= 0:
            raise MegalmError("sampler: total_samples, micro_batch_size and data_size must be positive")
        if not 0 <= data_rank < data_size:
            raise MegalmError(f"sampler: data_rank {data_rank} not in 0..{data_size - 1}")
        if consumed_samples < 0 or consumed_samples > total_samples:
            raise MegalmError(f"sampler: consumed_samples {consumed_samples} outside 0..{total_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.data_rank, self.data_size = micro_batch_size, data_rank, data_size

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.data_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.samples_per_step
        start = self.consumed_samples + self.data_rank * self.micro_batch_size
        for k in range(len(self)):
            lo = start + k * step
            yield list(range(lo, lo + self.micro_batch_size))


def build_dataloader(
    dataset: Any, sampler: MegatronPretrainingSampler, num_workers: int, collate: Collate | None = None,
) -> Any:
    """A torch DataLoader over `dataset` driven by `sampler`, yielding `collate`'s (inputs, labels)
    (default: (tokens, labels), int64 (batch, seq_len): two views of one buffer).

    It gets a generator of its own: a DataLoader without one draws its workers' base seed from the
    global torch RNG each time it starts iterating, which would shift the dropout masks of a resumed
    run (whose loader starts at the resume step) against an uninterrupted one. Samples need no
    randomness here: the sampler's order is fixed by the sample index."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate or Collate(),
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
