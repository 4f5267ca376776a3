"""Tokenize a corpus into Megatron shards with N worker processes, in bounded memory.

The reader (main process) cuts the input into chunks of raw records (`megalm.data.sources`); workers
decode, parse, tokenize and return each chunk as packed token bytes. At most `2 * workers` chunks are
in flight and results are written in input order, so memory stays bounded and the output is
byte-identical for any `--workers`.

Record rules: a document whose text is empty or only whitespace is skipped and counted
(`skipped_empty` in the meta); a bad record (malformed JSON, not an object, missing key, a non-string
or null value, bytes that are not UTF-8) stops the run with `file:line: why`, or with
`skip_bad_records` is skipped and counted (`skipped_bad`). With `append_eod` every document ends with
the tokenizer's EOD id. `num_shards` K > 1 deals documents round-robin into PREFIX_00000..K-1.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megalm.data.indexed import IndexedDatasetWriter, best_dtype
from megalm.data.meta import meta_path, write_meta
from megalm.data.sources import Chunk, iter_chunks, record_text, resolve_inputs
from megalm.data.tokenizer import Tokenizer, build_tokenizer
from megalm.errors import MegalmError


@dataclass
class EncodedChunk:
    """One chunk's documents as packed tokens in the shard dtype, plus what was skipped or wrong."""

    tokens: bytes
    lengths: np.ndarray
    skipped_empty: int
    skipped_bad: int
    error: str | None = None


@dataclass
class _WorkerState:
    tokenizer: Tokenizer
    dtype: np.dtype
    append_eod: bool
    skip_bad: bool


_STATE: _WorkerState | None = None


def _init_worker(tokenizer_type: str, tokenizer_model: str, append_eod: bool, skip_bad: bool) -> None:
    global _STATE
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _STATE = _WorkerState(tok, np.dtype(best_dtype(tok.vocab_size)), append_eod, skip_bad)


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    """Worker body: the chunk's documents, tokenized, EOD appended, packed in the shard dtype."""
    st = _STATE
    assert st is not None, "worker not initialised"
    texts: list[str] = []
    bad = 0
    for item, pos in zip(chunk.items, chunk.positions, strict=True):
        text, why = record_text(chunk, item)
        if why is not None:
            if not st.skip_bad:
                where = "row" if chunk.kind in ("parquet", "hf") else "line"
                return EncodedChunk(b"", np.zeros(0, np.int64), 0, 0, f"{chunk.source}:{pos} ({where}): {why}")
            bad += 1
        elif text.strip():
            texts.append(text)
    ids = st.tokenizer.encode_batch(texts)
    if st.append_eod:
        for x in ids:
            x.append(st.tokenizer.eod)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    keep = lengths > 0
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    empty = len(chunk.items) - bad - int(keep.sum())
    return EncodedChunk(flat.astype(st.dtype).tobytes(), lengths[keep], empty, bad)


@contextmanager
def worker_pool(workers: int, initializer: Callable, initargs: tuple) -> Iterator[Any]:
    """A pool of `workers` forked processes, or None (work in this process) for workers <= 1.

    fork, not spawn: spawn re-imports the caller's __main__, which fails from stdin or a notebook.
    The pool is made before any thread (tqdm's monitor) starts, so forking is safe. It ends with
    close() + join(), also on an error: the chunks in flight (at most 2 x workers) finish first.
    Pool.terminate() (what `with Pool` does) hung now and then with tasks in flight (2 of 300
    runs of a bad-record error with 2 workers), leaving zombie workers and a process that never exits.
    """
    if workers <= 1:
        initializer(*initargs)
        yield None
        return
    pool = mp.get_context("fork").Pool(workers, initializer, initargs)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Any, workers: int) -> Iterator[Any]:
    """map(fn, items) over the pool, results in input order, at most 2*workers chunks in flight.

    (Pool.imap would read the whole input ahead into its task queue; this keeps memory bounded.)
    """
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def shard_prefixes(prefix: str, num_shards: int) -> list[str]:
    return [prefix] if num_shards == 1 else [f"{prefix}_{k:05d}" for k in range(num_shards)]


@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    skipped_bad: int = 0


def _write_chunk(enc: EncodedChunk, writers: list[IndexedDatasetWriter], counts: Counts) -> None:
    if len(writers) == 1:
        writers[0].add_documents(enc.tokens, enc.lengths)
    else:
        flat = np.frombuffer(enc.tokens, dtype=writers[0].dtype)
        ends = np.cumsum(enc.lengths)
        for i, (end, n) in enumerate(zip(ends.tolist(), enc.lengths.tolist(), strict=True)):
            writers[(counts.documents + i) % len(writers)].add_document(flat[end - n : end])
    counts.documents += len(enc.lengths)
    counts.tokens += int(enc.lengths.sum())
    counts.skipped_empty += enc.skipped_empty
    counts.skipped_bad += enc.skipped_bad


def preprocess(
    inputs: list[str], json_key: str, tokenizer_type: str, tokenizer_model: str, output_prefix: str, *,
    workers: int = 1, append_eod: bool = True, num_shards: int = 1, skip_bad_records: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into `output_prefix` shards; return the summary (counts, seconds, paths)."""
    out_dir = Path(output_prefix).parent
    if not out_dir.is_dir():
        raise MegalmError(f"output folder '{out_dir}' does not exist; create it or fix --output-prefix")
    if workers < 1 or num_shards < 1:
        raise MegalmError("--workers and --num-shards must be at least 1")
    sources = resolve_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = shard_prefixes(output_prefix, num_shards)
    writers: list[IndexedDatasetWriter] = []
    counts, start = Counts(), time.perf_counter()
    try:
        writers.extend(IndexedDatasetWriter(p, dtype) for p in prefixes)
        initargs = (tokenizer_type, tokenizer_model, append_eod, skip_bad_records)
        with worker_pool(workers, _init_worker, initargs) as pool, _progress(progress) as bar:
            for enc in ordered_map(encode_chunk, iter_chunks(sources, json_key), pool, workers):
                if enc.error:
                    raise MegalmError(enc.error)
                _write_chunk(enc, writers, counts)
                bar.update(len(enc.lengths))
                bar.set_postfix_str(f"{counts.tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")
        _check_counts(counts, num_shards, writers)
        common = {
            "tokenizer": tokenizer.describe(), "dtype": np.dtype(dtype).name, "append_eod": append_eod,
            "json_key": json_key, "sources": [s.path for s in sources],
        }
        for k, (p, w) in enumerate(zip(prefixes, writers, strict=True)):
            meta_path(p).unlink(missing_ok=True)
            w.finish()
            write_meta(p, {**common, **_shard_counts(w), "shard": [k, num_shards],
                           "skipped_empty": counts.skipped_empty, "skipped_bad": counts.skipped_bad})
    except BaseException:
        for w in writers:
            w.abort()
        raise
    seconds = time.perf_counter() - start
    return {**counts.__dict__, "seconds": seconds, "prefixes": prefixes}


def _shard_counts(w: IndexedDatasetWriter) -> dict[str, Any]:
    return {"documents": w.num_documents, "tokens": w.num_tokens, "bin_sha256": w.bin_sha256()}


def _check_counts(counts: Counts, num_shards: int, writers: list[IndexedDatasetWriter]) -> None:
    if counts.documents == 0:
        raise MegalmError(
            f"no documents in the input ({counts.skipped_empty} empty and {counts.skipped_bad} bad records skipped)"
        )
    if any(w.num_documents == 0 for w in writers):
        raise MegalmError(f"only {counts.documents} documents for --num-shards {num_shards}; use fewer shards")


def _progress(enabled: bool | None):  # noqa: ANN202 - a tqdm bar
    """tqdm on stderr; None = only when stderr is a terminal (so logs and tests stay clean)."""
    return tqdm(unit=" docs", unit_scale=True, disable=None if enabled is None else not enabled, mininterval=1.0)
