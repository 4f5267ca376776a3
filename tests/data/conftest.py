"""Shared fixtures for the data-pipeline tests: small corpora, trained tokenizers, a CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EN = "the quick brown fox jumps over the lazy dog while 12345 people watch and talk about data".split()
ZH = "我们今天在北京学习中文语言模型训练数据处理非常重要的工作人民大学天气很好"


def make_texts(n: int, seed: int = 0, chinese: bool = False) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = f"doc {i}: " + " ".join(rng.choice(EN) for _ in range(rng.randint(3, 60)))
        if chinese:
            s += " " + "".join(rng.choice(ZH) for _ in range(rng.randint(5, 30)))
        out.append(s)
    return out


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return path


def run_tool(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tools/<tool>.py as a user would; returns the completed process (text mode)."""
    full_env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=REPO,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-document English+Chinese jsonl corpus."""
    d = tmp_path_factory.mktemp("corpus")
    return write_jsonl(d / "corpus.jsonl", make_texts(600, chinese=True))


@pytest.fixture(scope="session")
def tokenizers(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained bpe, unigram (sentencepiece .model) and bytelevel (tokenizer .json) files."""
    from megalm.data.tokenizer_training import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    out = {}
    for kind in ("bpe", "unigram", "bytelevel"):
        train_tokenizer([str(corpus)], kind, 500, str(d / kind), character_coverage=0.9995)
        out[kind] = d / (kind + (".json" if kind == "bytelevel" else ".model"))
    return out


@pytest.fixture()
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "hf_home"
