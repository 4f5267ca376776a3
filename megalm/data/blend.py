"""Weighted blend of datasets with exact, deterministic proportions.

Megatron assigns blended sample i greedily to the dataset whose share lags its weight the most. The
same schedule is computed here without a loop: dataset k's j-th sample is due at "time"
(j + 1/2) / w_k, and the blend takes samples in order of due time (ties to the lower dataset index).
After any n samples dataset k has contributed round(n * w_k) samples, give or take one.

A blend may change its weights at given samples (`Phase`: a mixture schedule, or a mixture changed on
resume, megalm.data.mixture): each phase runs the same schedule over its own samples with its own
weights (0: a source not drawn), and every source's samples continue from where the earlier phases
left it, so no source sample is repeated or skipped across a change. One phase is the plain blend.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from megalm.data.cache import cached_arrays
from megalm.errors import MegalmError

PARTS = ["dataset_index", "dataset_sample_index"]


def normalize_weights(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise MegalmError(f"blend weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def build_blend_index(weights: list[float], num_samples: int) -> dict[str, np.ndarray]:
    """dataset_index[i] (which dataset) and dataset_sample_index[i] (its j-th sample) for i < num_samples."""
    w = normalize_weights(weights)
    per = np.ceil(w * num_samples).astype(np.int64) + 1
    ds = np.repeat(np.arange(len(w)), per)
    j = np.concatenate([np.arange(n, dtype=np.int64) for n in per])
    due = (j + 0.5) / w[ds]
    order = np.lexsort((ds, due))[:num_samples]
    return {"dataset_index": ds[order].astype(np.int16), "dataset_sample_index": j[order]}


@dataclass(frozen=True)
class Phase:
    """From global blend sample `start` on, draw source k with weight `weights[k]` (0: not at all)."""

    start: int
    weights: tuple[float, ...]


def build_phased_index(phases: list[Phase], num_samples: int) -> dict[str, np.ndarray]:
    """build_blend_index's arrays for a blend whose weights change at each phase's start (the first at
    0, starts increasing): within a phase the schedule of its weights, each source's sample numbers
    continuing from the samples the earlier phases drew from it."""
    if not phases or phases[0].start != 0 or any(b.start <= a.start for a, b in itertools.pairwise(phases)):
        raise MegalmError(f"blend phases must start at sample 0 and at increasing samples, got {[p.start for p in phases]}")
    sources = len(phases[0].weights)
    drawn = np.zeros(sources, dtype=np.int64)
    datasets, samples = [], []
    for phase, end in zip(phases, [*(p.start for p in phases[1:]), num_samples], strict=True):
        n = min(end, num_samples) - phase.start
        if n <= 0:
            break
        active = np.flatnonzero(np.asarray(phase.weights) > 0)
        if len(active) == 0:
            raise MegalmError(f"the blend phase from sample {phase.start} draws from no source")
        part = build_blend_index([phase.weights[k] for k in active], n)
        ds = active[part["dataset_index"]]
        datasets.append(ds)
        samples.append(part["dataset_sample_index"] + drawn[ds])
        drawn += np.bincount(ds, minlength=sources)
    return {"dataset_index": np.concatenate(datasets).astype(np.int16), "dataset_sample_index": np.concatenate(samples)}


def blend_counts(weights: list[float], num_samples: int) -> np.ndarray:
    """How many samples the blend draws from each dataset (size the datasets with this)."""
    idx = build_blend_index(weights, num_samples)["dataset_index"]
    return np.bincount(idx, minlength=len(weights))


class BlendedDataset:
    """`ds[i]` = datasets[dataset_index[i]][dataset_sample_index[i]]; indices cached like GPTDataset's.
    `weights` for one mixture throughout, or `phases` for one that changes (build_phased_index)."""

    def __init__(
        self, datasets: list[Any], weights: list[float] | None, num_samples: int, cache_dir: str | None = None,
        name: str = "blend", phases: list[Phase] | None = None,
    ) -> None:
        if phases is None:
            normalize_weights(weights)  # checked here; the schedule normalises them itself
            phases = [Phase(0, tuple(float(w) for w in weights))]
        if any(len(p.weights) != len(datasets) for p in phases):
            raise MegalmError(f"{len(datasets)} datasets but {len(phases[0].weights)} weights")
        self.datasets, self.num_samples, self.name, self.phases = datasets, num_samples, name, phases
        self.weights = np.asarray(phases[0].weights) / sum(phases[0].weights)
        description = {
            "class": "BlendedDataset", "name": name, "num_samples": num_samples,
            "datasets": [getattr(d, "cache_key", None) or len(d) for d in datasets],
            # one phase keeps the key it always had: caches of existing runs stay valid
            **({"weights": self.weights.tolist()} if len(phases) == 1 else
               {"phases": [[p.start, list(p.weights)] for p in phases]}),
        }
        arrays, self.cache_key = cached_arrays(
            cache_dir, f"BlendedDataset-{name}", description, PARTS, lambda: build_phased_index(phases, num_samples)
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for k, (n, d) in enumerate(zip(counts, datasets, strict=True)):
            if n > len(d):
                raise MegalmError(f"{name}: dataset {k} has {len(d)} samples, the blend needs {n}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def source_of(self, i: int) -> tuple[int, int]:
        """(source k, its sample j) of blended sample i."""
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def drawn(self, n: int) -> np.ndarray:
        """How many samples each source gave the first n blended samples (its position after them)."""
        return np.bincount(self.dataset_index[:n], minlength=len(self.datasets))
