"""A checkpoint's manifest: every file it holds, with its size and sha256, recorded before `latest`
can name the checkpoint, and checked before anything reads it.

    global_stepN/manifest.json   {"format": 1, "files": {"mp_rank_00_model_states.pt":
                                                         {"size": 1234, "sha256": "..."}, ...}}

Recording is collective: after every rank has written and fsync'd its files, rank r hashes files
r, r + world, ... of the sorted list (read back from the page cache, so about the cost of one
sha256 pass over 1/world of the checkpoint), and rank 0 writes the manifest. `sha256sum` checks a
file by hand. Checking is `check(ckpt)`: presence and sizes (a stat per file) always, digests of the
files `digest` selects, optionally only this rank's share (`share=(rank, world)`), so a run's ranks
check a checkpoint together in one read. A checkpoint without a manifest (written before it
existed) passes with its sizes unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

MANIFEST_FILE = "manifest.json"
FORMAT = 1
CHUNK = 16 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Path) -> list[str]:
    """Relative paths (posix) of the files under `ckpt`, sorted: the manifest itself and temporary
    files excluded."""
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")]
    return sorted(p.relative_to(ckpt).as_posix() for p in files)


def record(ckpt: Path, rank: int = 0, world: int = 1) -> dict[str, dict] | None:
    """Collective when world > 1 (every rank calls it once its files are on disk): the manifest of
    `ckpt`, each rank hashing its share; rank 0 writes manifest.json and returns the entries."""
    names = checkpoint_files(ckpt)
    mine = {n: {"size": (ckpt / n).stat().st_size, "sha256": sha256_of(ckpt / n)}
            for i, n in enumerate(names) if i % world == rank}
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    if rank != 0:
        return None
    entries = {n: e for share in shares for n, e in sorted(share.items())}
    write(ckpt, entries)
    return entries


def write(ckpt: Path, entries: dict[str, dict]) -> None:
    """Write manifest.json of `ckpt` from its entries (relative path -> size, sha256) and fsync it."""
    tmp, path = ckpt / (MANIFEST_FILE + ".tmp"), ckpt / MANIFEST_FILE
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "files": dict(sorted(entries.items()))}, f, indent=1)
    os.replace(tmp, path)
    for synced in (path, ckpt):  # the file and its name are on disk before `latest` can name ckpt
        fd = os.open(synced, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read(ckpt: Path) -> dict[str, dict] | None:
    """The manifest's entries, None when the checkpoint has none; a damaged manifest is damage."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {str(n): {"size": int(e["size"]), "sha256": str(e["sha256"])} for n, e in raw["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {MANIFEST_FILE: {"size": -1, "sha256": ""}}  # reported as a damaged manifest


def check(ckpt: Path, *, digest: Callable[[str], bool] | bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when `ckpt` is intact as far as asked, else what is wrong with its first damaged file:
    missing, truncated or grown (a size that differs), or corrupt (a sha256 that differs).
    `digest`: hash all files (True), none (False: sizes only), or those it selects by name;
    `share` (rank, world): hash only files rank, rank + world, ... of the manifest."""
    entries = read(ckpt)
    if entries is None:
        return None
    if entries.get(MANIFEST_FILE, {}).get("size") == -1:
        return f"{ckpt / MANIFEST_FILE} is damaged (not the JSON megalm writes)"
    rank, world = share
    for i, (name, entry) in enumerate(sorted(entries.items())):
        path = ckpt / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        if size != entry["size"]:
            return f"{path} is {'truncated' if size < entry['size'] else 'grown'} ({size} of {entry['size']} bytes)"
        wanted = digest(name) if callable(digest) else digest
        if wanted and i % world == rank and sha256_of(path) != entry["sha256"]:
            return f"{path} is corrupt (its sha256 differs from the manifest's)"
    return None


def check_together(ckpt: Path, group: dist.ProcessGroup | None = None) -> str | None:
    """Collective: every rank of `group` hashes its share of `ckpt`; all return the same verdict."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    verdicts: list[str | None] = [None] * world
    dist.all_gather_object(verdicts, check(ckpt, share=(rank, world)), group=group)
    return next((v for v in verdicts if v is not None), None)
