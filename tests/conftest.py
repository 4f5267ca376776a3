"""Fixtures shared by the trainer, conversion and cluster tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Shards of the built-in corpus (Python's bundled docs), byte-tokenized: a prefix."""
    from megalm.data.preprocess import preprocess
    from megalm.data.stdlib_corpus import write_stdlib_corpus

    d = tmp_path_factory.mktemp("shards")
    corpus = write_stdlib_corpus(d / "corpus.jsonl")
    preprocess([str(corpus)], "text", "byte", "", str(d / "docs"), workers=1, progress=False)
    return str(d / "docs")
