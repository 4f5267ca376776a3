"""PREFIX.meta.json: megalm's sidecar to a shard (tokenizer fingerprint, counts, sha256 of the .bin).

megatron-core ignores it. A shard without one (written by another tool) is accepted as foreign; a
shard whose fingerprint differs from the run's tokenizer is refused, because its ids would mean
other pieces and training would silently learn noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import megalm
from megalm.data.tokenizer import Tokenizer
from megalm.errors import MegalmError

FORMAT = "megalm.indexed/1"


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".meta.json")


def write_meta(prefix: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write PREFIX.meta.json atomically (temporary name, then rename)."""
    path = meta_path(prefix)
    tmp = Path(str(path) + ".partial")
    full = {"format": FORMAT, "megalm_version": megalm.__version__, **meta}
    tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_meta(prefix: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar as a dict, or None when the shard has none (a foreign shard)."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MegalmError(f"{path}: unreadable shard metadata ({e})") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise MegalmError(f"{path}: not a megalm shard metadata file (no 'tokenizer' entry)")
    return meta


def check_shard_tokenizer(prefix: str | os.PathLike, tokenizer: Tokenizer) -> None:
    """Raise MegalmError when PREFIX was tokenized by another tokenizer; no meta.json = allowed."""
    meta = read_meta(prefix)
    if meta is None:
        return
    recorded = meta["tokenizer"]
    if recorded.get("fingerprint") != tokenizer.fingerprint():
        raise MegalmError(
            f"shard '{prefix}' was tokenized with another tokenizer ({recorded.get('type')}, vocab "
            f"{recorded.get('vocab_size')}, fingerprint {str(recorded.get('fingerprint'))[:12]}) than this run's "
            f"({tokenizer.type}, vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint()[:12]}); "
            "re-run tools/preprocess_data.py with the run's tokenizer or fix data.tokenizer_model"
        )
