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


@pytest.fixture(scope="session")
def short_doc_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte-tokenized shards of short documents (12-60 bytes, each ended by EOD): a 64-token
    window holds two to six of them, so masking attention per document changes every sample."""
    import json

    from megalm.data.preprocess import preprocess
    from megalm.data.stdlib_corpus import stdlib_documents

    d = tmp_path_factory.mktemp("short_docs")
    corpus = d / "corpus.jsonl"
    lengths = [12, 30, 60, 21, 45, 17, 38]
    with open(corpus, "w", encoding="utf-8") as f:
        for i, text in enumerate(stdlib_documents()[:2000]):
            n = lengths[i % len(lengths)]
            f.write(json.dumps({"text": text[:n]}) + "\n")
    preprocess([str(corpus)], "text", "byte", "", str(d / "docs"), workers=1, progress=False)
    return str(d / "docs")
