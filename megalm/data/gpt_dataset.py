"""GPT pretraining samples: fixed windows of seq_len + 1 tokens over shuffled, concatenated documents.

Megatron's semantics, built with vectorized numpy (no C++ helper, no Python loop over documents):

- document index: the split's documents, shuffled anew each epoch, epochs concatenated (as many
  epochs as `num_samples` needs). Read in this order, the documents form one token *stream*.
- sample index (num_samples + 1, 2): row j = (position in the document index, offset in that
  document) of stream token j * seq_len. Sample j is stream tokens [j*seq_len, (j+1)*seq_len]
  inclusive: seq_len + 1 tokens, so consecutive samples share one token (the last input's label)
  and every stream token is a label exactly once.
- shuffle index: a permutation of the samples; item i of the dataset is sample shuffle[i].

The three arrays are cached (`megalm.data.cache`) under a key of everything they depend on: the .idx
file (path, size, mtime), the split's documents, seq_len, num_samples and seed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from megalm.data.cache import cached_arrays, load_arrays
from megalm.data.indexed import IndexedDataset
from megalm.errors import MegalmError

INDEX_VERSION = 2
PARTS = ["document_index", "sample_index", "shuffle_index"]


def build_document_index(doc_ids: np.ndarray, num_epochs: int, seed: int) -> np.ndarray:
    """`num_epochs` permutations of `doc_ids`, concatenated. Epoch e draws from its own generator
    (seed, 0, e), so the first epochs do not depend on how many are built."""
    dtype = np.int32 if len(doc_ids) == 0 or doc_ids.max() < 2**31 else np.int64
    return np.concatenate([np.random.default_rng([seed, 0, e]).permutation(doc_ids).astype(dtype)
                           for e in range(num_epochs)])


def build_sample_index(lengths_in_order: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) int64 rows (document position, offset) of stream tokens j * seq_len.

    `lengths_in_order` are the lengths of the documents in document-index order; zero-length
    documents are skipped naturally (searchsorted 'right' never lands on them).
    """
    ends = np.cumsum(lengths_in_order, dtype=np.int64)
    if ends[-1] < num_samples * seq_len + 1:
        raise ValueError("not enough tokens for the requested samples")
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[pos] - lengths_in_order[pos])
    return np.stack([pos.astype(np.int64), offsets], axis=1)


def build_indices(
    doc_ids: np.ndarray, doc_lengths: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """The three index arrays for the documents `doc_ids` (lengths looked up in `doc_lengths`).

    Samples are the windows j * seq_len .. (j + 1) * seq_len of the stream of epochs; sample j
    belongs to the epoch its first token lies in, and the shuffle permutes each epoch's samples
    with a generator of its own (seed, 1, e). The indices cover every sample starting in the
    epochs `num_samples` needs (plus the documents to complete the last window), so the first N
    samples are the same whatever num_samples >= N is asked for: a run extended to more steps,
    or resumed with another batch layout, sees the same data order.
    """
    tokens_per_epoch = int(doc_lengths[doc_ids].sum(dtype=np.int64))
    if tokens_per_epoch == 0:
        raise MegalmError("the split's documents hold no tokens")
    num_epochs = max(1, -(-num_samples * seq_len // tokens_per_epoch))
    samples = -(-num_epochs * tokens_per_epoch // seq_len)  # windows starting in those epochs
    extra_epochs = -(-(seq_len + 1) // tokens_per_epoch)  # documents to finish the last window
    document_index = build_document_index(doc_ids, num_epochs + extra_epochs, seed)
    lengths = doc_lengths[document_index].astype(np.int64)
    sample_index = build_sample_index(lengths, seq_len, samples)
    epoch_of = np.arange(samples, dtype=np.int64) * seq_len // tokens_per_epoch
    bounds = np.searchsorted(epoch_of, np.arange(num_epochs + 1), side="left")
    shuffle_index = np.concatenate([
        bounds[e] + np.random.default_rng([seed, 1, e]).permutation(bounds[e + 1] - bounds[e])
        for e in range(num_epochs)
    ]).astype(np.int64)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """`ds[i]` -> int64 array of seq_len + 1 tokens (inputs = [:-1], labels = [1:]).

    `doc_ids` are the documents of this split (indices into `indexed`'s documents).
    """

    def __init__(
        self, indexed: IndexedDataset, doc_ids: np.ndarray, seq_len: int, num_samples: int, seed: int,
        cache_dir: str | None, name: str,
    ) -> None:
        if seq_len < 1 or num_samples < 1:
            raise MegalmError(f"{name}: seq_len and num_samples must be positive (got {seq_len}, {num_samples})")
        if len(doc_ids) == 0:
            raise MegalmError(f"{name}: the split has no documents; use more data or change data.split")
        if not indexed.is_contiguous():
            raise MegalmError(f"{indexed.prefix}: sequences are not stored back to back; cannot sample windows")
        self.indexed, self.seq_len, self.num_samples, self.name = indexed, seq_len, num_samples, name
        self.doc_lengths = indexed.document_lengths()
        self.doc_offsets = indexed.document_offsets()
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.description = self._describe(doc_ids, seed)
        arrays, self.cache_key = cached_arrays(
            cache_dir, f"GPTDataset-{name}", self.description, PARTS,
            lambda: build_indices(doc_ids, self.doc_lengths, seq_len, num_samples, seed),
        )
        self.cache_dir = cache_dir
        self._set_arrays(arrays)

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the cached arrays (a worker re-maps them instead of receiving a copy)."""
        state = dict(self.__dict__)
        if self.cache_dir:
            for part in PARTS:
                del state[part]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache_dir:
            self._set_arrays(load_arrays(self.cache_dir, f"GPTDataset-{self.name}", self.cache_key, PARTS))

    def _describe(self, doc_ids: np.ndarray, seed: int) -> dict[str, Any]:
        st = os.stat(self.indexed.idx_path)
        return {
            "class": "GPTDataset", "version": INDEX_VERSION, "name": self.name,
            "idx": os.path.abspath(self.indexed.idx_path), "idx_size": st.st_size, "idx_mtime_ns": st.st_mtime_ns,
            "documents_sha256": hashlib.sha256(doc_ids.tobytes()).hexdigest(), "num_documents": len(doc_ids),
            "seq_len": self.seq_len, "num_samples": self.num_samples, "seed": seed,
        }

    def __len__(self) -> int:
        return self.num_samples

    def sample_id(self, i: int) -> int:
        """Position of item i in the unshuffled stream of samples (stable across runs for one cache key)."""
        return int(self.shuffle_index[i])

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j : j + 2].tolist()
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        tokens, offsets, docs = self.indexed.tokens, self.doc_offsets, self.document_index
        if d0 == d1:
            start = int(offsets[docs[d0]]) + o0
            out[:] = tokens[start : start + self.seq_len + 1]
            return out
        filled = 0
        for pos in range(d0, d1 + 1):
            doc = int(docs[pos])
            lo = o0 if pos == d0 else 0
            hi = o1 + 1 if pos == d1 else int(self.doc_lengths[doc])
            start = int(offsets[doc])
            out[filled : filled + hi - lo] = tokens[start + lo : start + hi]
            filled += hi - lo
        assert filled == self.seq_len + 1, (filled, self.seq_len)
        return out
