"""Byte compatibility with megatron-core's indexed dataset, both ways, and corrupt-file errors."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from megalm.data.indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetWriter
from megalm.errors import MegalmError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch = pytest.importorskip("torch")
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(rng: np.random.Generator, dtype: type) -> list[list[np.ndarray]]:
    """Documents of 0-3 sequences, some sequences empty."""
    hi = 120 if np.dtype(dtype).kind in "iu" else 1000
    return [
        [rng.integers(0, hi, size=rng.integers(0, 9)).astype(dtype) for _ in range(rng.integers(0, 4))]
        for _ in range(40)
    ]


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_megalm_reads_megatron_core_files(tmp_path: Path, code: int) -> None:
    dtype = DTYPE_CODES[code]
    docs = _docs(np.random.default_rng(code), dtype)
    prefix = str(tmp_path / "mc")
    b = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        b.add_document(torch.from_numpy(np.concatenate(doc) if doc else np.zeros(0, dtype)), [len(s) for s in doc])
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype
    seqs = [s for doc in docs for s in doc]
    assert len(ds) == len(seqs) and ds.num_documents == len(docs)
    for got, want in zip([ds[i] for i in range(len(ds))], seqs, strict=True):
        np.testing.assert_array_equal(got, want)
    for d, doc in enumerate(docs):
        want = np.concatenate(doc) if doc else np.zeros(0, dtype)
        np.testing.assert_array_equal(ds.document(d), want)
        assert ds.document_lengths()[d] == len(want)
    assert ds.is_contiguous()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_megatron_core_reads_megalm_files(tmp_path: Path, dtype: type) -> None:
    docs = _docs(np.random.default_rng(7), dtype)
    prefix = str(tmp_path / "ml")
    w = IndexedDatasetWriter(prefix, dtype)
    for doc in docs[:20]:
        w.add_document(np.concatenate(doc) if doc else np.zeros(0, dtype), [len(s) for s in doc])
    flat = [np.concatenate(doc) if doc else np.zeros(0, dtype) for doc in docs[20:]]
    w.add_documents(np.concatenate(flat).astype(dtype).tobytes(), np.array([len(x) for x in flat]))
    w.finish()
    ref = mc.IndexedDataset(prefix)
    seqs = [s for doc in docs[:20] for s in doc] + flat
    assert len(ref) == len(seqs)
    for i, want in enumerate(seqs):
        np.testing.assert_array_equal(ref[i], want)
        assert ref[i].dtype == dtype
    ours = IndexedDataset(prefix)
    np.testing.assert_array_equal(ref.document_indices, ours.document_indices)
    np.testing.assert_array_equal(ref.sequence_lengths, ours.sequence_lengths)
    assert Path(prefix + ".idx").read_bytes()[9:18] == struct.pack("<Q", 1) + bytes([{np.uint16: 8, np.int32: 4,
                                                                                      np.uint8: 1, np.int64: 5}[dtype]])


def _write_small(prefix: str) -> None:
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document(np.arange(10))
    w.add_document(np.arange(5))
    w.finish()


def test_corrupt_files_name_the_file_and_the_defect(tmp_path: Path) -> None:
    prefix = str(tmp_path / "x")
    _write_small(prefix)
    idx = Path(prefix + ".idx")
    good = idx.read_bytes()
    cases = {
        b"NOTANIDX\x00" + good[9:]: "wrong magic",
        good[:9] + struct.pack("<Q", 2) + good[17:]: "unsupported index version 2",
        good[:17] + bytes([9]) + good[18:]: "unknown dtype code 9",
        good[:40]: "truncated",
        good[:20]: "truncated header",
    }
    for data, what in cases.items():
        idx.write_bytes(data)
        with pytest.raises(MegalmError, match=what) as e:
            IndexedDataset(prefix)
        assert str(idx) in str(e.value)
    idx.write_bytes(good)
    Path(prefix + ".bin").write_bytes(Path(prefix + ".bin").read_bytes()[:20])
    with pytest.raises(MegalmError, match="truncated"):
        IndexedDataset(prefix)
    with pytest.raises(MegalmError, match="no such file"):
        IndexedDataset(str(tmp_path / "nope"))


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    prefix = str(tmp_path / "y")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document(np.arange(4))
    w.abort()
    assert list(tmp_path.iterdir()) == []
