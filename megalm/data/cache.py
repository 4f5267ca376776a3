"""A cache of index arrays as .npy files, built once per key and memory-mapped by every rank.

Files: CACHE_DIR/{hash}-{name}-{part}.npy plus {hash}-{name}-description.json, written last as the
"complete" marker. One process builds under a file lock (`filelock`, works for all ranks of a node
and on shared filesystems that support POSIX locks); the others wait for the lock, find the marker and
load with `mmap_mode='r'`, so N ranks share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from megalm.errors import MegalmError


def cache_key(description: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything the arrays depend on (first 32 hex digits)."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cached_arrays(
    cache_dir: str | os.PathLike | None, name: str, description: dict[str, Any], parts: list[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], str]:
    """The arrays `parts` for `description`: loaded from cache_dir, or built (once) and saved there.

    Returns (arrays, key). Without cache_dir the arrays are built in memory every time.
    """
    key = cache_key(description)
    if not cache_dir:
        return build(), key
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MegalmError(f"data.cache_dir '{root}' cannot be created: {e.strerror}") from None
    stem = root / f"{key}-{name}"
    marker = Path(f"{stem}-description.json")
    if not marker.is_file():
        with FileLock(f"{stem}.lock"):
            if not marker.is_file():
                _save(stem, marker, description, build())
    return load_arrays(cache_dir, name, key, parts), key


def load_arrays(cache_dir: str | os.PathLike, name: str, key: str, parts: list[str]) -> dict[str, np.ndarray]:
    """Memory-map cached arrays (used again after unpickling in a DataLoader worker)."""
    stem = Path(cache_dir) / f"{key}-{name}"
    return {p: np.load(f"{stem}-{p}.npy", mmap_mode="r") for p in parts}


def _save(stem: Path, marker: Path, description: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    for part, arr in arrays.items():
        tmp = f"{stem}-{part}.npy.partial"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, f"{stem}-{part}.npy")
    tmp = f"{marker}.partial"
    Path(tmp).write_text(json.dumps(description, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
