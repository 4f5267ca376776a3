"""Megatron-compatible indexed dataset: PREFIX.bin (tokens) + PREFIX.idx (where each sequence lies).

Layout of PREFIX.idx (little-endian; identical to megatron-core's `IndexedDataset`)::

    offset 0   9 bytes   magic  b"MMIDIDX\\x00\\x00"
    offset 9   u64       version = 1
    offset 17  u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    offset 18  u64       S = number of sequences
    offset 26  u64       D = number of document boundaries (= documents + 1; the leading 0 is stored)
    offset 34  int32[S]  sequence lengths, in tokens
               int64[S]  byte offset of each sequence in PREFIX.bin
               int64[D]  document indices: document d is sequences [doc[d], doc[d+1])

The arrays are unaligned (they start at byte 34); `np.frombuffer(..., offset=)` reads them without a
copy. PREFIX.bin is the tokens of every sequence concatenated, nothing else. A document usually holds
one sequence (megalm writes one per document); megatron-core's sentence splitting writes several, and
an empty document is a repeated value in the document indices. megalm's `.meta.json` sidecar is an
addition megatron-core ignores.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

import numpy as np

from megalm.errors import MegalmError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits with margin (vocab < 65500, Megatron's rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx)."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx")


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx; tokens are memory-mapped, never copied until asked.

    `ds[i]` is sequence i (as megatron-core); `ds.document(d)` concatenates document d's sequences.
    `sequence_offsets[i]` is the token offset of sequence i in the .bin. Picklable (re-opens the files),
    so DataLoader workers do not copy the mapping.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        bin_path, idx_path = data_paths(self.prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise MegalmError(f"{p}: no such file (is '{self.prefix}' the prefix of a PREFIX.bin/.idx pair?)")
        self.dtype, lengths, pointers, docs = _read_index(idx_path)
        self.sequence_lengths: np.ndarray = lengths
        self.sequence_pointers: np.ndarray = pointers
        self.document_indices: np.ndarray = docs
        itemsize = np.dtype(self.dtype).itemsize
        bin_size = bin_path.stat().st_size
        if bin_size % itemsize:
            raise MegalmError(f"{bin_path}: size {bin_size} is not a multiple of the token size {itemsize}")
        end = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
        if end > bin_size:
            raise MegalmError(f"{bin_path}: truncated: the index needs {end} bytes, the file has {bin_size}")
        self.bin_path = bin_path
        self.idx_path = idx_path
        if bin_size == 0:  # np.memmap cannot map an empty file
            self.tokens: np.ndarray = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        self.sequence_offsets = (pointers // itemsize).astype(np.int64)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_offsets[i])
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64), summing its sequences; empty documents are 0."""
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]

    def document_offsets(self) -> np.ndarray:
        """Token offset in the .bin of each document's first token (valid when sequences are stored in order)."""
        starts = self.document_indices[:-1]
        offsets = np.zeros(len(starts), dtype=np.int64)
        has = starts < len(self.sequence_offsets)
        offsets[has] = self.sequence_offsets[starts[has]]
        return offsets

    def is_contiguous(self) -> bool:
        """True when the sequences are stored back to back in order (every known writer does this)."""
        cum = np.cumsum(self.sequence_lengths[:-1], dtype=np.int64)
        return bool(np.array_equal(self.sequence_offsets[1:], cum)) and (
            len(self.sequence_offsets) == 0 or self.sequence_offsets[0] == 0
        )

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (a view when it holds one sequence)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if hi - lo == 1:
            return self[lo]
        parts = [self[i] for i in range(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def _read_index(path: Path) -> tuple[type[np.number], np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate an .idx file; every defect is a MegalmError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
        raise MegalmError(f"{path}: not an indexed-dataset index (wrong magic {header[:9]!r}, expected {MAGIC!r})")
    if len(header) < HEADER_SIZE:
        raise MegalmError(f"{path}: truncated header ({size} bytes, need {HEADER_SIZE})")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise MegalmError(f"{path}: unsupported index version {version} (megalm reads version {VERSION})")
    code = header[17]
    if code not in DTYPE_CODES:
        raise MegalmError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    num_seq, num_doc = struct.unpack("<QQ", header[18:34])
    need = HEADER_SIZE + num_seq * 12 + num_doc * 8
    if size < need:
        raise MegalmError(
            f"{path}: truncated: {num_seq} sequences and {num_doc} document indices need {need} bytes, file has {size}"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    lengths = np.frombuffer(buf, dtype="<i4", count=num_seq, offset=HEADER_SIZE)
    pointers = np.frombuffer(buf, dtype="<i8", count=num_seq, offset=HEADER_SIZE + num_seq * 4)
    docs = np.frombuffer(buf, dtype="<i8", count=num_doc, offset=HEADER_SIZE + num_seq * 12)
    if num_doc < 1 or docs[0] != 0 or docs[-1] != num_seq or np.any(np.diff(docs) < 0):
        raise MegalmError(f"{path}: corrupt document indices (must rise from 0 to the sequence count {num_seq})")
    return DTYPE_CODES[code], lengths, pointers, docs


def write_index(path: str | os.PathLike, dtype: np.dtype, lengths: np.ndarray, doc_indices: np.ndarray) -> None:
    """Write an .idx for sequences of `lengths` stored back to back in the .bin (pointers derived)."""
    dtype = np.dtype(dtype)
    pointers = np.zeros(len(lengths), dtype="<i8")
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", VERSION) + bytes([CODE_OF_DTYPE[dtype]]))
        f.write(struct.pack("<QQ", len(lengths), len(doc_indices)))
        f.write(np.asarray(lengths).astype("<i4").tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(doc_indices).astype("<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


class IndexedDatasetWriter:
    """Write PREFIX.bin/.idx under temporary names; `finish()` renames them into place, .idx last.

    Until `finish()` returns nothing named PREFIX.bin/.idx is touched, so an interrupted run leaves
    only `*.partial` files (removed by `abort()`), never a pair that looks valid. The sha256 of the
    .bin is computed while writing.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise MegalmError(f"dtype {self.dtype} has no megatron dtype code")
        self.bin_path, self.idx_path = data_paths(self.prefix)
        self._bin_tmp = Path(str(self.bin_path) + ".partial")
        self._idx_tmp = Path(str(self.idx_path) + ".partial")
        self._bin = open(self._bin_tmp, "wb")
        self._sha = hashlib.sha256()
        self._lengths = array("q")
        self._docs = array("q", [0])
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray, lengths: list[int] | None = None) -> None:
        """Append one document: its tokens and, optionally, the lengths of its sequences (default one)."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._write(data)
        self._lengths.extend(lengths if lengths is not None else [len(tokens)])
        self._docs.append(len(self._lengths))
        self.num_tokens += len(data) // self.dtype.itemsize

    def add_documents(self, tokens: bytes, doc_lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` already in this dtype, concatenated."""
        self._write(tokens)
        first = len(self._lengths)
        self._lengths.extend(doc_lengths.astype(np.int64).tolist())
        self._docs.extend(range(first + 1, len(self._lengths) + 1))
        self.num_tokens += int(doc_lengths.sum())

    def add_dataset(self, ds: IndexedDataset) -> None:
        """Append every sequence and document of `ds` (same dtype), copying its .bin in 16 MB blocks."""
        if np.dtype(ds.dtype) != self.dtype:
            raise MegalmError(f"{ds.prefix}: dtype {np.dtype(ds.dtype).name} differs from {self.dtype.name}")
        if not ds.is_contiguous():
            raise MegalmError(f"{ds.prefix}: sequences are not stored back to back; cannot merge it by copying")
        with open(ds.bin_path, "rb") as f:
            while block := f.read(1 << 24):
                self._write(block)
        first = len(self._lengths)
        self._lengths.extend(ds.sequence_lengths.astype(np.int64).tolist())
        self._docs.extend((ds.document_indices[1:] + first).tolist())
        self.num_tokens += ds.num_tokens

    def _write(self, data: bytes) -> None:
        self._bin.write(data)
        self._sha.update(data)

    @property
    def num_documents(self) -> int:
        return len(self._docs) - 1

    def bin_sha256(self) -> str:
        return self._sha.hexdigest()

    def finish(self) -> None:
        """Write the index, then rename .bin and .idx into place (an old .idx is removed first)."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise MegalmError(f"{self.prefix}: a sequence longer than 2^31 tokens cannot be indexed")
        write_index(self._idx_tmp, self.dtype, lengths, np.frombuffer(self._docs, dtype=np.int64))
        self.idx_path.unlink(missing_ok=True)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are left as they were."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
