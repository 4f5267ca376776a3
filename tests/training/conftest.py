"""Shards for the trainer tests: the Python docs bundled with the standard library, byte-tokenized."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def write_stdlib_corpus(path: Path) -> Path:
    """One JSON line per paragraph of the pydoc topic texts (offline, on every Python)."""
    import pydoc_data.topics

    with open(path, "w", encoding="utf-8") as f:
        for _, text in sorted(pydoc_data.topics.topics.items()):
            for para in text.split("\n\n"):
                if len(para.strip()) > 40:
                    f.write(json.dumps({"text": para.strip()}) + "\n")
    return path


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from megalm.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("shards")
    corpus = write_stdlib_corpus(d / "corpus.jsonl")
    preprocess([str(corpus)], "text", "byte", "", str(d / "docs"), workers=1, progress=False)
    return str(d / "docs")


def train_env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                PYTHONPATH=str(REPO))


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> loss; a step logged twice (a killed run, then its resumption) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
