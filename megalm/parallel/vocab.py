"""Vocabulary padding: the embedding table and output head have V_pad >= V rows.

V_pad is the tokenizer's V rounded up to a multiple of model.make_vocab_size_divisible_by x the
tensor-parallel size, so the vocabulary splits evenly over the tensor ranks (Megatron's
`--make-vocab-size-divisible-by`). The padding rows start at zero, take no probability in the loss
(megalm.parallel.cross_entropy masks them) and never leave megalm: exports, generation and the
checkpoint reader strip them, and the writer pads again for the layout it writes.
"""

from __future__ import annotations

import torch

from megalm.config.values import ceil_div


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_size: int) -> int:
    """Smallest multiple of divisible_by * tensor_size that holds vocab_size rows."""
    multiple = divisible_by * tensor_size
    return ceil_div(vocab_size, multiple) * multiple


def pad_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (V, ...) with zero rows appended up to `rows` (V_pad); unchanged when it has them."""
    if rows <= weight.size(0):
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.size(0), *weight.shape[1:])])


def strip_vocab_padding(t: torch.Tensor, vocab_size: int, dim: int = 0) -> torch.Tensor:
    """The first `vocab_size` entries along `dim`: an embedding/head weight (dim 0) or logits
    (dim -1) without the tensor-parallel padding, as exports and generation need it."""
    return t.narrow(dim, 0, vocab_size)
