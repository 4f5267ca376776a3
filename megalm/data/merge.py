"""Merge shards into one: same dtype and tokenizer required; documents keep their order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalm.data.meta import meta_path, read_meta, write_meta
from megalm.errors import MegalmError


def _tokenizer_of(prefixes: list[str]) -> dict[str, Any] | None:
    """The tokenizer all shards share (None when none has a meta.json); a mix is an error."""
    metas = [read_meta(p) for p in prefixes]
    if all(m is None for m in metas):
        return None
    for p, m in zip(prefixes, metas, strict=True):
        if m is None:
            raise MegalmError(f"shard '{p}' has no meta.json, so its tokenizer cannot be checked against the others")
    first = metas[0]["tokenizer"]
    for p, m in zip(prefixes, metas, strict=True):
        if m["tokenizer"].get("fingerprint") != first.get("fingerprint"):
            raise MegalmError(f"shard '{p}' was tokenized with another tokenizer than '{prefixes[0]}'; cannot merge")
    return first


def merge_datasets(prefixes: list[str], output_prefix: str) -> dict[str, Any]:
    """Concatenate shards into OUTPUT (.bin/.idx renamed into place last, then meta.json)."""
    if not prefixes:
        raise MegalmError("no input shards given")
    if not Path(output_prefix).parent.is_dir():
        raise MegalmError(f"output folder '{Path(output_prefix).parent}' does not exist")
    if output_prefix in prefixes:
        raise MegalmError(f"--output-prefix '{output_prefix}' is also an input")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {np.dtype(d.dtype).name for d in datasets}
    if len(dtypes) > 1:
        raise MegalmError(f"shards have different token dtypes ({', '.join(sorted(dtypes))}); cannot merge")
    tokenizer = _tokenizer_of(prefixes)
    writer = IndexedDatasetWriter(output_prefix, datasets[0].dtype)
    try:
        for d in datasets:
            writer.add_dataset(d)
        meta_path(output_prefix).unlink(missing_ok=True)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    summary = {
        "documents": writer.num_documents, "tokens": writer.num_tokens, "bin_sha256": writer.bin_sha256(),
        "dtype": dtypes.pop(), "merged_from": [str(p) for p in prefixes],
    }
    if tokenizer is not None:
        write_meta(output_prefix, {"tokenizer": tokenizer, **summary})
    return summary
