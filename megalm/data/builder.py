"""From the `data` config section to (train, valid, test) datasets, the way Megatron users expect.

`train_prefixes` is a list of shard prefixes (blended in proportion to their token counts, as if
concatenated) or of [weight, prefix] pairs. Each prefix's *documents* are split by `split` ("98,1,1") into
contiguous train/valid/test ranges (Megatron's rounding); several prefixes are blended per split with
`BlendedDataset`. Every shard's meta.json must match the run's tokenizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megalm.config import DataConfig, parse_split
from megalm.data.blend import BlendedDataset, blend_counts, build_phased_index
from megalm.data.gpt_dataset import GPTDataset
from megalm.data.indexed import IndexedDataset
from megalm.data.meta import check_shard_tokenizer
from megalm.data.mixture import MixturePlan
from megalm.data.tokenizer import Tokenizer
from megalm.errors import MegalmError

SPLITS = ("train", "valid", "test")


def parse_prefixes(train_prefixes: list[Any]) -> tuple[list[float] | None, list[str]]:
    """(weights or None, prefixes) from a list of prefixes or of [weight, prefix] pairs."""
    if not train_prefixes:
        raise MegalmError("data.train_prefixes is empty: give the shard prefixes written by tools/preprocess_data.py")
    if all(isinstance(p, str) for p in train_prefixes):
        return None, list(train_prefixes)
    pairs = [p for p in train_prefixes if isinstance(p, (list, tuple)) and len(p) == 2]
    if len(pairs) != len(train_prefixes):
        raise MegalmError("data.train_prefixes: use only prefixes or only [weight, prefix] pairs, not a mix")
    return [float(w) for w, _ in pairs], [str(p) for _, p in pairs]


def split_bounds(num_documents: int, fractions: list[float]) -> list[int]:
    """Document boundaries [0, a, b, num_documents] of train/valid/test (Megatron's rounding)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def open_shards(prefixes: list[str], tokenizer: Tokenizer) -> list[IndexedDataset]:
    """The shards of `prefixes`, each checked against the tokenizer (its meta.json, its largest ids)."""
    indexed = [IndexedDataset(p) for p in prefixes]
    for p, ds in zip(prefixes, indexed, strict=True):
        check_shard_tokenizer(p, tokenizer)
        if len(ds) and int(np.max(ds.tokens[-min(len(ds.tokens), 1 << 20):], initial=0)) >= tokenizer.vocab_size:
            raise MegalmError(f"shard '{p}' holds token ids >= the tokenizer's vocab size {tokenizer.vocab_size}")
    return indexed


def token_weights(indexed: list[IndexedDataset]) -> list[float]:
    """Plain prefixes blend in proportion to their tokens, as if concatenated."""
    return [max(ds.num_tokens, 1) for ds in indexed]


def build_datasets(
    cfg: DataConfig, tokenizer: Tokenizer, seed: int, num_samples: tuple[int, int, int], mixture: MixturePlan | None = None,
) -> tuple[Any, Any, Any]:
    """(train, valid, test) datasets of cfg.seq_len + 1 token samples; the train split blends
    `mixture`'s sources by its phases (megalm.data.mixture) when given, else data.train_prefixes.

    A split asked for 0 samples is None, and so is a valid/test split without documents; a train
    split without documents, a wrong prefix or a shard of another tokenizer is a MegalmError.
    """
    if cfg.seq_len is None:
        raise MegalmError("data.seq_len is not set (validate the config first)")
    weights, prefixes = parse_prefixes(cfg.train_prefixes)
    indexed = open_shards(prefixes, tokenizer)
    if weights is None:
        weights = token_weights(indexed)
    bounds = [split_bounds(ds.num_documents, parse_split(cfg.split)) for ds in indexed]
    out = [
        _build_split(s, indexed, bounds, weights, cfg, seed, num_samples[s]) if num_samples[s] > 0 else None
        for s in range(len(SPLITS))
    ]
    if mixture is not None and num_samples[0] > 0 and (len(mixture.phases) > 1 or list(mixture.sources) != prefixes):
        out[0] = _build_mixture(mixture, tokenizer, cfg, seed, num_samples[0])
    return out[0], out[1], out[2]


def _build_mixture(mixture: MixturePlan, tokenizer: Tokenizer, cfg: DataConfig, seed: int, num_samples: int) -> Any:
    """The train split of each of the plan's sources, blended by its phases."""
    indexed = open_shards(list(mixture.sources), tokenizer)
    s = SPLITS.index("train")
    bounds = [split_bounds(ds.num_documents, parse_split(cfg.split)) for ds in indexed]
    empty = [p for p, b in zip(mixture.sources, bounds, strict=True) if b[s + 1] == b[s]]
    if empty:
        raise MegalmError(f"data source {empty[0]} has no documents in the train split of data.split='{cfg.split}'")
    counts = np.bincount(build_phased_index(list(mixture.phases), num_samples)["dataset_index"],
                         minlength=len(indexed))
    parts = [GPTDataset(ds, np.arange(b[s], b[s + 1]), cfg.seq_len, max(int(c), 1), seed, cfg.cache_dir or None, "train")
             for ds, b, c in zip(indexed, bounds, counts, strict=True)]
    return BlendedDataset(parts, None, num_samples, cfg.cache_dir or None, "train", phases=list(mixture.phases))


def _build_split(
    s: int, indexed: list[IndexedDataset], bounds: list[list[int]], weights: list[float], cfg: DataConfig,
    seed: int, num_samples: int,
) -> Any:
    """Split s of every prefix that has documents in it; several are blended by weight."""
    name, cache = SPLITS[s], cfg.cache_dir or None
    have = [k for k, b in enumerate(bounds) if b[s + 1] > b[s]]
    if not have:
        if s > 0:
            return None  # an empty valid/test split: the trainer decides whether it needs one
        raise MegalmError(f"the train split of data.split='{cfg.split}' has no documents")

    def one(k: int, count: int) -> GPTDataset:
        docs = np.arange(bounds[k][s], bounds[k][s + 1])
        return GPTDataset(indexed[k], docs, cfg.seq_len, count, seed, cache, name)

    if len(have) == 1 and len(indexed) == 1:
        return one(have[0], num_samples)
    w = [weights[k] for k in have]
    counts = blend_counts(w, num_samples)
    parts = [one(k, max(int(c), 1)) for k, c in zip(have, counts, strict=True)]
    return BlendedDataset(parts, w, num_samples, cache, name)
