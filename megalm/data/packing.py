"""What a training batch holds: tokens and labels, and for packed documents where each one is.

A sample is seq_len + 1 tokens of concatenated documents, each ended by the tokenizer's EOD
(megalm.data.gpt_dataset). `Collate` turns a list of samples into the batch a rank trains on:

    inputs  tokens (batch, s)                                    without model.document_mask
            (tokens, positions, documents)                       with it
    labels  (batch, s): the next token of each input

    documents  (batch, seq_len) int64: the document of each input token of the whole sample,
               counted from 0 (a token after an EOD starts the next document; the EOD itself
               belongs to the document it ends). Attention stays inside a document.
    positions  (batch, s) int64: each token's position in the sample, or, with
               model.document_positions, in its document (restarting at 0).

Under context parallelism (`context_size` C) a rank keeps its chunk of s = seq_len / C contiguous
tokens of tokens, labels and positions, from the loader on; `documents` stays whole (seq_len
integers per sample, what attention over the whole sequence needs after the all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def document_ids(tokens: np.ndarray, eod: int) -> np.ndarray:
    """(batch, seq) document index of each token: the number of EODs strictly before it."""
    ends = (tokens == eod).astype(np.int64)
    ids = np.zeros_like(ends)
    np.cumsum(ends[:, :-1], axis=1, out=ids[:, 1:])
    return ids


def document_positions(documents: np.ndarray) -> np.ndarray:
    """(batch, seq) position of each token inside its document (0 at each document's first token)."""
    seq = documents.shape[1]
    index = np.broadcast_to(np.arange(seq, dtype=np.int64), documents.shape)
    first = np.ones(documents.shape, dtype=bool)
    first[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - np.maximum.accumulate(np.where(first, index, 0), axis=1)


@dataclass(frozen=True)
class Collate:
    """samples (list of seq_len + 1 int arrays) -> (inputs, labels) for one rank (see the module doc).

    eod: the tokenizer's end-of-document id when attention is masked per document, else None.
    """

    eod: int | None = None
    document_positions: bool = False
    context_rank: int = 0
    context_size: int = 1

    def __call__(self, samples: list[np.ndarray]) -> tuple[Any, torch.Tensor]:
        batch = np.stack(samples).astype(np.int64, copy=False)
        seq = batch.shape[1] - 1
        chunk = seq // self.context_size
        mine = slice(self.context_rank * chunk, (self.context_rank + 1) * chunk)
        both = torch.from_numpy(batch)  # tokens and labels: two views of one buffer
        tokens, labels = both[:, :-1][:, mine], both[:, 1:][:, mine]
        if self.eod is None:
            return tokens, labels
        documents = document_ids(batch[:, :-1], self.eod)
        if self.document_positions:
            positions = document_positions(documents)[:, mine]
        else:
            positions = np.broadcast_to(np.arange(seq, dtype=np.int64)[mine], tokens.shape)
        return (tokens, torch.from_numpy(np.ascontiguousarray(positions)), torch.from_numpy(documents)), labels
