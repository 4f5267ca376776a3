"""Attention inside documents and sliding windows: the masks and the kernels that use them.

A packed sample holds several documents back to back; `documents` (batch, seq) numbers them
(megalm.data.packing). Query i may attend to key j when j <= i and both lie in the same
document: causal attention, block-diagonal by document. With a sliding window W (Mistral) also
i - j < W. Without documents the whole sample is one document.

    GPU: FlexAttention, torch.compile'd, with a BlockMask built from the document ids a tile at a
        time (`document_block_mask`): tiles wholly inside one document run unmasked, tiles that
        cross a boundary evaluate the mask, tiles between different documents are skipped. No
        (seq x seq) mask exists.
    CPU: torch 2.13's FlexAttention has no backward on CPU (and uncompiled it materialises the
        scores anyway), so SDPA gets a boolean (batch, 1, seq, seq) mask (`document_dense_mask`):
        seq^2 bytes per sample, fine at the lengths a CPU trains.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128
"""FlexAttention's tile (queries x keys)."""


@dataclass(frozen=True)
class Packing:
    """Where this rank's tokens sit, for the blocks: `positions` (seq,) or (batch, seq) for RoPE
    (None: the chunk's place in the sequence, megalm.parallel.context_parallel.chunk_positions),
    `documents` (batch, whole seq) document ids (None: causal over the whole sequence) and
    `start_pos`, generation's KV-cache position of the first token."""

    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    start_pos: int = 0
    masks: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    """The attention mask of `documents`, built by the first block and shared by the others."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    """RoPE's cos and sin tables (max_seq_len, head_dim), indexed by position (the model's buffers:
    read, not recomputed, by every block); None: each block computes them from the positions."""

    def document_mask(self, cuda: bool, seq: int, window: int = 0, device: torch.device | None = None,
                      ) -> BlockMask | torch.Tensor:
        """The mask `masked_attention` uses: a BlockMask on GPU, a dense boolean one on CPU, for
        the documents (None: one document of `seq` tokens) and the sliding window (0: none)."""
        kind = "block" if cuda else "dense"
        if kind not in self.masks:
            documents = self.documents
            if documents is None:
                documents = torch.zeros(1, seq, dtype=torch.long, device=device)
            build = document_block_mask if cuda else document_dense_mask
            self.masks[kind] = build(documents, window)
        return self.masks[kind]


def document_block_mask(documents: torch.Tensor, window: int = 0, block: int = BLOCK) -> BlockMask:
    """The causal, per-document BlockMask of `documents` (batch, seq) (non-decreasing ids per row),
    within the sliding `window` (0: none)."""
    b, seq = documents.shape
    tiles = -(-seq // block)
    pad = tiles * block - seq  # padding tokens get a document of their own
    docs = F.pad(documents, (0, pad), value=0) if pad else documents
    if pad:
        docs[:, seq:] = documents[:, -1:] + 1
    first = docs[:, ::block]  # (batch, tiles): document of each tile's first and last token
    last = docs[:, block - 1::block]
    q_first, q_last = first[:, :, None], last[:, :, None]
    k_first, k_last = first[:, None, :], last[:, None, :]
    causal = torch.ones(tiles, tiles, dtype=torch.bool, device=docs.device).tril()
    overlap = (k_first <= q_last) & (k_last >= q_first) & causal  # some pair may attend
    full = (q_first == q_last) & (k_first == k_last) & (q_first == k_first) & causal.tril(-1)
    if window:  # tile distance: q tile i, k tile j span token distances (i - j) * block -+ (block - 1)
        distance = (torch.arange(tiles, device=docs.device)[:, None] - torch.arange(tiles, device=docs.device)) * block
        overlap = overlap & (distance - (block - 1) < window)  # the nearest pair is inside the window
        full = full & (distance + (block - 1) < window)  # the farthest pair is too
    partial = overlap & ~full

    def blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = mask.sum(-1, dtype=torch.int32)[:, None]  # (batch, 1 head, q tiles)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return count, order

    def same_document(batch, head, q, kv):  # noqa: ANN001, ANN202 - FlexAttention's mask_mod signature
        allowed = (q >= kv) & (docs[batch, q] == docs[batch, kv])
        return allowed & (q - kv < window) if window else allowed

    (num, idx), (full_num, full_idx) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=same_document,
                                    seq_lengths=(seq, seq))


def document_dense_mask(documents: torch.Tensor, window: int = 0) -> torch.Tensor:
    """(batch, 1, seq, seq) bool: True where query i may attend to key j (j <= i, same document,
    i - j < window when there is one)."""
    seq = documents.size(1)
    causal = causal_mask(0, seq, seq, window, documents.device)
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def causal_mask(start: int, seq: int, total: int, window: int, device: torch.device) -> torch.Tensor:
    """(seq, total) bool: queries at positions start..start+seq-1 see keys 0..total-1 up to their
    own position and, with a sliding window, fewer than `window` positions back."""
    rows = torch.arange(start, start + seq, device=device)[:, None]
    keys = torch.arange(total, device=device)[None, :]
    return (keys <= rows) & (keys > rows - window) if window else keys <= rows


@functools.cache
def _compiled_flex_attention():  # noqa: ANN202
    return torch.compile(flex_attention, dynamic=False)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, window: int = 0,
                     ) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + per-document causal mask) v for q (batch, heads, seq, d) and k, v
    (batch, kv_heads, seq, d), the documents of `packing` (batch, seq) (None: one document) within
    the sliding `window` (0: none)."""
    gqa = q.size(1) != k.size(1)
    mask = packing.document_mask(q.is_cuda, q.size(2), window, q.device)
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
