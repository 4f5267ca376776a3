"""Tokenizer round trips, special ids, fingerprints, and tools/train_tokenizer.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megalm.data.tokenizer import ByteTokenizer, build_tokenizer
from megalm.errors import MegalmError

from .conftest import run_tool

SAMPLES = ["hello world 2024", "我们今天在北京学习", "mixed 中文 and English, 123 numbers!", "tab\tand\nnewline", "é ñ ü"]


def test_byte_tokenizer_round_trip_and_ids() -> None:
    tok = build_tokenizer("byte", "")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (257, 256, None, 256)
    assert tok.encode("hé") == [104, 195, 169]
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([104, 105, 256]) == "hi"
    assert tok.files() == [] and len(tok.fingerprint()) == 64


@pytest.mark.parametrize("kind", ["bpe", "unigram", "bytelevel"])
def test_trained_tokenizers_round_trip(tokenizers: dict[str, Path], kind: str) -> None:
    tok = build_tokenizer("hf" if kind == "bytelevel" else "sentencepiece", str(tokenizers[kind]))
    assert tok.vocab_size == 500
    for s in SAMPLES + ["unseen characters: ☃ 𝔘 ÿ"]:  # byte fallback / byte-level: nothing is unknown
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    assert tok.files() == [str(tokenizers[kind])]
    if kind == "bytelevel":
        assert tok.eod == 0 and tok.encode("a<|endoftext|>b")[1] == 0
    else:
        assert (tok.eod, tok.bos) == (2, 1)  # sentencepiece's eos id ends documents
        assert len(tok.encode("a 12345")) >= 5  # split_digits: one piece per digit


def test_fingerprint_ignores_file_bytes(tokenizers: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    """Retraining on a copy of the corpus at another path gives different .model bytes, the same fingerprint."""
    from megalm.data.tokenizer_training import train_tokenizer

    copy = shutil.copy(corpus, tmp_path / "elsewhere.jsonl")
    train_tokenizer([str(copy)], "bpe", 500, str(tmp_path / "again"))
    a = build_tokenizer("sentencepiece", str(tokenizers["bpe"]))
    b = build_tokenizer("sentencepiece", str(tmp_path / "again.model"))
    assert a.fingerprint() == b.fingerprint()
    fps = {build_tokenizer("sentencepiece", str(tokenizers["unigram"])).fingerprint(), a.fingerprint(),
           build_tokenizer("hf", str(tokenizers["bytelevel"])).fingerprint(), ByteTokenizer().fingerprint()}
    assert len(fps) == 4


def test_build_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(MegalmError, match="not found"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(MegalmError, match="not a readable sentencepiece model"):
        build_tokenizer("sentencepiece", str(junk))
    with pytest.raises(MegalmError, match="not a readable tokenizer.json"):
        build_tokenizer("hf", str(junk))
    with pytest.raises(MegalmError, match="unknown tokenizer type"):
        build_tokenizer("gpt2", "")


def test_train_tokenizer_cli_mixed_english_chinese(corpus: Path, tmp_path: Path) -> None:
    r = run_tool("train_tokenizer", "--input", corpus, "--type", "bpe", "--vocab-size", "600",
                 "--output-prefix", tmp_path / "zh", "--special-tokens", "<sep>")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "zh.info.json").read_text())
    tok = build_tokenizer("sentencepiece", str(tmp_path / "zh.model"))
    assert info["fingerprint"] == tok.fingerprint() and info["vocab_size"] == 600 and info["eod"] == 2
    assert info["special_tokens"] == ["<sep>"] and tok.encode("a<sep>b").count(tok.sp.piece_to_id("<sep>")) == 1
    zh = "中文语言模型训练"
    ids = tok.encode(zh)
    assert tok.decode(ids) == zh and len(ids) < len(zh.encode("utf-8"))  # Chinese characters got pieces


def test_train_tokenizer_cli_errors(tmp_path: Path) -> None:
    r = run_tool("train_tokenizer", "--input", tmp_path / "none.jsonl", "--type", "bpe", "--vocab-size", "300",
                 "--output-prefix", tmp_path / "t")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: input '{tmp_path}/none.jsonl': no such file"]
