"""A built-in corpus that exists offline on every Python: the documentation bundled with the
standard library (`pydoc_data.topics`, the text `help()` shows: ~450 kB of English prose and code)."""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path


def stdlib_documents(min_chars: int = 40) -> list[str]:
    """One document per paragraph of the pydoc topic texts, in a fixed order."""
    docs = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        docs.extend(p.strip() for p in text.split("\n\n") if len(p.strip()) > min_chars)
    return docs


def write_stdlib_corpus(path: str | Path) -> Path:
    """Write the documents as jsonl ({"text": ...} per line) and return the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    return path
