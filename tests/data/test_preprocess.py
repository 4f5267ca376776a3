"""tools/preprocess_data.py and tools/merge_datasets.py: formats, determinism, sharding, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megalm.data.indexed import IndexedDataset
from megalm.data.meta import check_shard_tokenizer, read_meta
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError

from .conftest import make_texts, run_tool, write_jsonl


def preprocess(inp: object, prefix: Path, *extra: str, tok: tuple[str, str] = ("byte", "")) -> object:
    args = ["--input", *(inp if isinstance(inp, list) else [inp]), "--tokenizer-type", tok[0],
            "--output-prefix", prefix, "--append-eod", *extra]
    if tok[1]:
        args += ["--tokenizer-model", tok[1]]
    return run_tool("preprocess_data", *args)


def expected_docs(texts: list[str], tok_type: str = "byte", model: str = "") -> list[list[int]]:
    tok = build_tokenizer(tok_type, model)
    return [tok.encode(t) + [tok.eod] for t in texts if t.strip()]


def assert_docs(prefix: Path, docs: list[list[int]]) -> None:
    ds = IndexedDataset(prefix)
    assert ds.num_documents == len(docs)
    for d, want in enumerate(docs):
        assert ds.document(d).tolist() == want


@pytest.mark.parametrize("kind", ["bpe", "bytelevel"])
def test_workers_give_byte_identical_output(tmp_path: Path, tokenizers: dict[str, Path], kind: str) -> None:
    texts = make_texts(2500, seed=3, chinese=True)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    tok = ("hf" if kind == "bytelevel" else "sentencepiece", str(tokenizers[kind]))
    for w in (1, 2):
        r = preprocess(inp, tmp_path / f"w{w}", "--workers", str(w), tok=tok)
        assert r.returncode == 0, r.stderr
        assert "2500 documents" in r.stdout
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert_docs(tmp_path / "w1", expected_docs(texts, *tok))
    meta = read_meta(tmp_path / "w1")
    t = build_tokenizer(*tok)
    assert meta["tokenizer"]["fingerprint"] == t.fingerprint() and meta["dtype"] == "uint16"
    assert meta["documents"] == 2500 and meta["tokens"] == IndexedDataset(tmp_path / "w1").num_tokens
    assert meta["bin_sha256"] == hashlib.sha256((tmp_path / "w1.bin").read_bytes()).hexdigest()


def test_input_formats(tmp_path: Path, hf_home: Path) -> None:
    """jsonl.gz, txt (blank-line separated paragraphs), parquet and a save_to_disk folder, with a glob."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(30, seed=5)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in texts[:10])
    pq.write_table(pa.table({"content": texts[10:20], "other": list(range(10))}), tmp_path / "b.parquet")
    datasets.Dataset.from_dict({"content": texts[20:30]}).save_to_disk(str(tmp_path / "hfdir"))
    (tmp_path / "c.txt").write_text("para one\nstill one\n\n\n  \npara two\n")
    (tmp_path / "out").mkdir()
    inputs = [str(tmp_path / "*.jsonl.gz"), tmp_path / "b.parquet", tmp_path / "hfdir", tmp_path / "c.txt"]
    r = preprocess(inputs, tmp_path / "out" / "all", "--json-key", "content")
    assert r.returncode == 0, r.stderr
    assert_docs(tmp_path / "out" / "all", expected_docs(texts + ["para one\nstill one", "para two"]))


def test_num_shards_and_merge(tmp_path: Path) -> None:
    texts = make_texts(7, seed=9)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    r = preprocess(inp, tmp_path / "s", "--num-shards", "3")
    assert r.returncode == 0, r.stderr
    docs = expected_docs(texts)
    for k in range(3):
        assert_docs(tmp_path / f"s_{k:05d}", docs[k::3])
    shards = [str(tmp_path / f"s_{k:05d}") for k in range(3)]
    r = run_tool("merge_datasets", "--input", *shards, "--output-prefix", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert_docs(tmp_path / "m", docs[0::3] + docs[1::3] + docs[2::3])
    assert read_meta(tmp_path / "m")["tokenizer"] == read_meta(shards[0])["tokenizer"]


def test_merge_refuses_other_tokenizer(tmp_path: Path, tokenizers: dict[str, Path]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_texts(5))
    assert preprocess(inp, tmp_path / "a").returncode == 0
    assert preprocess(inp, tmp_path / "b", tok=("sentencepiece", str(tokenizers["bpe"]))).returncode == 0
    r = run_tool("merge_datasets", "--input", tmp_path / "a", tmp_path / "b", "--output-prefix", tmp_path / "m")
    assert r.returncode == 2 and "another tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m*"))


BAD_LINE = {"malformed": b'{"text": "ok"\n', "missing key": b'{"body": "x"}\n', "non-utf8": b'{"text": "\xff\xfe"}\n'}


@pytest.mark.parametrize("case", sorted(BAD_LINE))
def test_bad_records_fail_with_file_and_line_or_are_skipped(tmp_path: Path, case: str) -> None:
    good = [json.dumps({"text": t}).encode() + b"\n" for t in make_texts(3000, seed=1)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(good[:2000]) + BAD_LINE[case] + b"".join(good[2000:]))
    (tmp_path / "out").mkdir()
    r = preprocess(inp, tmp_path / "out" / "p", "--workers", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {inp}:2001 (line): ")
    assert {"malformed": "malformed JSON", "missing key": "no key 'text'", "non-utf8": "not valid UTF-8"}[case] in lines[0]
    assert os.listdir(tmp_path / "out") == []
    r = preprocess(inp, tmp_path / "out" / "p", "--skip-bad-records")
    assert r.returncode == 0, r.stderr
    assert read_meta(tmp_path / "out" / "p")["skipped_bad"] == 1 and IndexedDataset(tmp_path / "out" / "p").num_documents == 3000


def test_empty_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ["a", "", "   \n ", "b"])
    r = preprocess(inp, tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert_docs(tmp_path / "p", [[97, 256], [98, 256]])
    assert read_meta(tmp_path / "p")["skipped_empty"] == 2


def one_line_error(r: object, out: Path, *expect: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for e in expect:
        assert e in lines[0]
    assert not out.exists() or os.listdir(out) == []


def test_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = write_jsonl(tmp_path / "good.jsonl", ["x"])
    one_line_error(preprocess(empty, out / "p"), out, "no documents")
    one_line_error(preprocess(write_jsonl(tmp_path / "e.jsonl", ["", " "]), out / "p"), out, "no documents", "2 empty")
    one_line_error(preprocess(tmp_path / "nope.jsonl", out / "p"), out, "nope.jsonl", "no such file")
    one_line_error(preprocess(str(tmp_path / "*.nothing"), out / "p"), out, "matches no file")
    one_line_error(preprocess(good, tmp_path / "missing_dir" / "p"), out, "missing_dir", "does not exist")
    one_line_error(preprocess(good, out / "p", tok=("sentencepiece", str(tmp_path / "x.model"))), out, "x.model")
    (tmp_path / "f.csv").write_text("a,b\n")
    one_line_error(preprocess(tmp_path / "f.csv", out / "p"), out, "unsupported input type")
    data = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in make_texts(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    one_line_error(preprocess(tmp_path / "cut.jsonl.gz", out / "p"), out, "cut.jsonl.gz", "cannot read")


def test_parquet_null_is_a_bad_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "n.parquet")
    (tmp_path / "out").mkdir()
    one_line_error(preprocess(tmp_path / "n.parquet", tmp_path / "out" / "p"), tmp_path / "out", "n.parquet:2 (row)", "null")
    r = preprocess(tmp_path / "n.parquet", tmp_path / "out" / "p", "--skip-bad-records")
    assert r.returncode == 0 and read_meta(tmp_path / "out" / "p")["skipped_bad"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_input(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "secret.jsonl", ["x"])
    bad.chmod(0)
    one_line_error(preprocess(bad, tmp_path / "out" / "p"), tmp_path / "out", "not readable")


def test_check_shard_tokenizer(tmp_path: Path, tokenizers: dict[str, Path]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ["hello"])
    assert preprocess(inp, tmp_path / "p").returncode == 0
    check_shard_tokenizer(tmp_path / "p", build_tokenizer("byte", ""))  # same tokenizer: fine
    sp = build_tokenizer("sentencepiece", str(tokenizers["bpe"]))
    with pytest.raises(MegalmError, match="another tokenizer"):
        check_shard_tokenizer(tmp_path / "p", sp)
    (tmp_path / "p.meta.json").unlink()
    check_shard_tokenizer(tmp_path / "p", sp)  # no meta.json: a foreign shard, allowed
    assert np.array_equal(IndexedDataset(tmp_path / "p").document(0), [104, 101, 108, 108, 111, 256])
