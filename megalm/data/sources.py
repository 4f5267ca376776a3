"""Input discovery and streaming: jsonl(.gz), txt(.gz), parquet and `datasets` save_to_disk folders.

Files are read in *chunks* of raw records, never whole. A chunk carries where its records came from
(`file:line` or `file:row`) so a worker can name the exact record it rejects. JSON parsing and UTF-8
decoding happen in the workers (`megalm.data.preprocess`), the reader only splits.

Document rules:
- jsonl: one JSON object per line, the text under `--json-key`; blank lines are ignored.
- txt: a document is a run of non-blank lines; one or more blank lines separate documents (so a
  file with no blank lines is one document).
- parquet / save_to_disk: one row per document, the text in column `--json-key`; a
  `DatasetDict` folder uses its `train` split.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megalm.errors import MegalmError

CHUNK_RECORDS = 1024
CHUNK_BYTES = 1 << 20
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
TXT_SUFFIXES = (".txt", ".txt.gz")


@dataclass
class Source:
    """One input: a file or a save_to_disk folder, and how to read it (jsonl, txt, parquet, hf)."""

    path: str
    kind: str


@dataclass
class Chunk:
    """Consecutive records of one source. `items` are bytes (jsonl lines, txt paragraphs) or text
    (parquet/hf rows, None where missing); `positions[i]` is item i's line or row number (1-based)."""

    source: str
    kind: str
    key: str
    items: list = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


def record_text(chunk: Chunk, item: Any) -> tuple[str | None, str | None]:
    """The text of one record of `chunk`: (text, None), or (None, why the record is bad)."""
    if chunk.kind in ("parquet", "hf"):
        if item is None:
            return None, f"'{chunk.key}' is null"
        return (item, None) if isinstance(item, str) else (None, f"'{chunk.key}' is not a string")
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{item[e.start]:02x} at offset {e.start})"
    if chunk.kind == "txt":
        return text, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if chunk.key not in obj:
        return None, f"no key '{chunk.key}' (keys: {', '.join(list(obj)[:5])}); set --json-key"
    value = obj[chunk.key]
    return (value, None) if isinstance(value, str) else (None, f"'{chunk.key}' is not a string")


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    if name.endswith(".parquet"):
        return "parquet"
    raise MegalmError(f"{path}: unsupported input type (use .jsonl[.gz], .txt[.gz], .parquet or a save_to_disk folder)")


def _is_hf_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand files, globs and folders (sorted, so the output order is reproducible); check readability."""
    sources: list[Source] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise MegalmError(f"input pattern '{spec}' matches no file")
        else:
            matches = [spec]
        for m in matches:
            path = Path(m)
            if path.is_dir():
                if not _is_hf_dir(path):
                    raise MegalmError(f"{path}: a folder, but not a `datasets` save_to_disk folder (no state.json)")
                sources.append(Source(str(path), "hf"))
                continue
            if not path.exists():
                raise MegalmError(f"input '{path}': no such file")
            kind = _kind_of(path)
            if not os.access(path, os.R_OK):
                raise MegalmError(f"input '{path}': not readable (permission denied)")
            sources.append(Source(str(path), kind))
    if not sources:
        raise MegalmError("no input given")
    return sources


def iter_chunks(sources: list[Source], key: str) -> Iterator[Chunk]:
    """Every record of every source, in order, in chunks of ~1 MB / 1024 records."""
    readers = {"jsonl": _jsonl_chunks, "txt": _txt_chunks, "parquet": _parquet_chunks, "hf": _hf_chunks}
    for src in sources:
        try:
            yield from readers[src.kind](src, key)
        except (OSError, EOFError) as e:
            raise MegalmError(f"{src.path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _open(path: str):  # noqa: ANN202 - a binary file object, gzip or plain
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _batched(src: Source, key: str, records: Iterator[tuple[int, bytes]]) -> Iterator[Chunk]:
    chunk, size = Chunk(src.path, src.kind, key), 0
    for pos, item in records:
        chunk.items.append(item)
        chunk.positions.append(pos)
        size += len(item)
        if len(chunk.items) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = Chunk(src.path, src.kind, key), 0
    if chunk.items:
        yield chunk


def _jsonl_chunks(src: Source, key: str) -> Iterator[Chunk]:
    def lines() -> Iterator[tuple[int, bytes]]:
        with _open(src.path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line

    yield from _batched(src, key, lines())


def _txt_chunks(src: Source, key: str) -> Iterator[Chunk]:
    def paragraphs() -> Iterator[tuple[int, bytes]]:
        with _open(src.path) as f:
            buf: list[bytes] = []
            start = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if not buf:
                        start = lineno
                    buf.append(line)
                elif buf:
                    yield start, b"".join(buf).rstrip(b"\r\n")
                    buf = []
            if buf:
                yield start, b"".join(buf).rstrip(b"\r\n")

    yield from _batched(src, key, paragraphs())


def _text_batches(src: Source, key: str, batches: Iterator[list]) -> Iterator[Chunk]:
    row = 0
    for texts in batches:
        for start in range(0, len(texts), CHUNK_RECORDS):
            part = texts[start : start + CHUNK_RECORDS]
            yield Chunk(src.path, src.kind, key, part, list(range(row + 1, row + 1 + len(part))))
            row += len(part)


def _parquet_chunks(src: Source, key: str) -> Iterator[Chunk]:
    import pyarrow as pa  # noqa: PLC0415 - heavy, only for parquet input
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        pf = pq.ParquetFile(src.path)
    except pa.ArrowException as e:
        raise MegalmError(f"{src.path}: not a readable parquet file ({e})") from None
    if key not in pf.schema_arrow.names:
        raise MegalmError(f"{src.path}: no column '{key}' (columns: {', '.join(pf.schema_arrow.names)}); set --json-key")
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=[key]))
    yield from _text_batches(src, key, batches)


def _hf_chunks(src: Source, key: str) -> Iterator[Chunk]:
    import datasets  # noqa: PLC0415 - heavy, only for save_to_disk input

    ds = datasets.load_from_disk(src.path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise MegalmError(f"{src.path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if key not in ds.column_names:
        raise MegalmError(f"{src.path}: no column '{key}' (columns: {', '.join(ds.column_names)}); set --json-key")
    batches = (b[key] for b in ds.select_columns([key]).iter(batch_size=CHUNK_RECORDS))
    yield from _text_batches(src, key, batches)
