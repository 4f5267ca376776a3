"""Long sequences under every layout: document masking and context parallelism train the tiny model
for 10 fp32 steps to the single-process losses within 1e-5 (short documents, so a 64-token window
holds several and the mask changes every sample)."""

from __future__ import annotations

import functools

import pytest

from megalm.testing.parity import (
    REFERENCE,
    Layout,
    max_relative_difference,
    run_layout,
    run_layout_ranks,
    train_rank,
)
from megalm.testing.runs import TINY

FP32_RTOL = 1e-5
MASK = ["model.document_mask=true"]
CHUNKED = ["model.loss_chunk_tokens=24"]  # the fused loss in several chunks per micro batch


@functools.cache
def _losses(layout: Layout, prefix: str, extra: tuple[str, ...]) -> list[float]:
    overrides = [f"data.train_prefixes=[{prefix}]", "train.steps=10", "train.global_batch_size=8",
                 "train.precision=fp32", *CHUNKED, *extra]
    return run_layout(layout, TINY, overrides)


@pytest.mark.slow
def test_document_mask_under_tensor_sequence_pipeline_and_zero3(short_doc_shards):
    reference = _losses(REFERENCE, short_doc_shards, tuple(MASK))
    unmasked = _losses(REFERENCE, short_doc_shards, ())
    assert max_relative_difference(unmasked, reference) > 1e-3  # the mask changes training
    layouts = [Layout(tensor=2, sequence_parallel=True), Layout(pipeline=2), Layout(data=2, zero=3)]
    diffs = {x.name: max_relative_difference(_losses(x, short_doc_shards, tuple(MASK)), reference) for x in layouts}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


def _spied_rank(config: str, overrides: list[str]) -> tuple[list[float] | None, set, set]:
    """train_rank, recording the sequence length of every attention call: the (batch, seq / C,
    heads, d) chunk given to Ulysses, and the (batch, seq, heads / C, d) whole sequences its
    all-to-all hands the local kernel."""
    from megalm.parallel import context_parallel

    chunks, wholes = set(), set()
    init, call = context_parallel.UlyssesAttention.__init__, context_parallel.UlyssesAttention.__call__

    def spy_init(self, local, group):  # noqa: ANN001
        def spied_local(q, k, v, **kw):  # noqa: ANN001, ANN202
            wholes.add(q.shape[1])
            return local(q, k, v, **kw)
        init(self, spied_local, group)

    def spy_call(self, q, k, v, **kw):  # noqa: ANN001, ANN202
        chunks.add(q.shape[1])
        return call(self, q, k, v, **kw)

    context_parallel.UlyssesAttention.__init__, context_parallel.UlyssesAttention.__call__ = spy_init, spy_call
    return train_rank(config, overrides), chunks, wholes


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-mask"])
def test_context_parallel_matches_one_process(short_doc_shards, masked):
    # tiny has 4 heads and 2 kv heads (GQA): CP2 splits both; with TP2 as well kv heads must be 4.
    # DP2 would give the same losses: every rank must also have seen its half of each sequence
    # (32 of the 64 tokens) go into Ulysses and the whole sequence come out of its all-to-all
    mask = tuple(MASK) if masked else ()
    gqa, mha = mask, (*mask, "model.num_kv_heads=4")
    cases = [(Layout(context=2), gqa), (Layout(context=2, data=2, zero=2), gqa),
             (Layout(context=2, tensor=2, sequence_parallel=True), mha)]
    diffs = {}
    for layout, extra in cases:
        reference = _losses(REFERENCE, short_doc_shards, extra)
        overrides = [f"data.train_prefixes=[{short_doc_shards}]", "train.steps=10", "train.global_batch_size=8",
                     "train.precision=fp32", *CHUNKED, *extra]
        ranks = run_layout_ranks(layout, TINY, overrides, rank=_spied_rank)
        assert all(chunks == {32} and wholes == {64} for _, chunks, wholes in ranks), (layout.name, ranks)
        diffs[layout.name] = max_relative_difference(ranks[0][0], reference)
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


@pytest.mark.slow
def test_context_parallel_at_zero_0_and_3(short_doc_shards):
    # ZeRO-0: DeepSpeed's own all-reduce over data x context; ZeRO-3: parameters partitioned over it
    reference = _losses(REFERENCE, short_doc_shards, ())
    overrides = [f"data.train_prefixes=[{short_doc_shards}]", "train.steps=10", "train.global_batch_size=8",
                 "train.precision=fp32", *CHUNKED]
    diffs = {}
    for layout in (Layout(context=2, zero=0), Layout(context=2, zero=3)):
        ranks = run_layout_ranks(layout, TINY, overrides, rank=_spied_rank)
        assert all(chunks == {32} and wholes == {64} for _, chunks, wholes in ranks), (layout.name, ranks)
        diffs[layout.name] = max_relative_difference(ranks[0][0], reference)
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs
