"""Weighted blend of datasets with exact, deterministic proportions.

Megatron assigns blended sample i greedily to the dataset whose share lags its weight the most. The
same schedule is computed here without a loop: dataset k's j-th sample is due at "time"
(j + 1/2) / w_k, and the blend takes samples in order of due time (ties to the lower dataset index).
After any n samples dataset k has contributed round(n * w_k) samples, give or take one.
"""

from __future__ import annotations

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


def blend_counts(weights: list[float], num_samples: int) -> np.ndarray:
    """How many samples the blend draws from each dataset (size the datasets with this)."""
    idx = build_blend_index(weights, num_samples)["dataset_index"]
    return np.bincount(idx, minlength=len(weights))


class BlendedDataset:
    """`ds[i]` = datasets[dataset_index[i]][dataset_sample_index[i]]; indices cached like GPTDataset's."""

    def __init__(
        self, datasets: list[Any], weights: list[float], num_samples: int, cache_dir: str | None = None,
        name: str = "blend",
    ) -> None:
        if len(datasets) != len(weights):
            raise MegalmError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.num_samples, self.name = datasets, num_samples, name
        self.weights = normalize_weights(weights)
        description = {
            "class": "BlendedDataset", "name": name, "weights": self.weights.tolist(), "num_samples": num_samples,
            "datasets": [getattr(d, "cache_key", None) or len(d) for d in datasets],
        }
        arrays, self.cache_key = cached_arrays(
            cache_dir, f"BlendedDataset-{name}", description, PARTS, lambda: build_blend_index(weights, num_samples)
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
