"""Long sequences under every layout: document masking and context parallelism train the tiny model
for 10 fp32 steps to the single-process losses within 1e-5 (short documents, so a 64-token window
holds several and the mask changes every sample)."""

from __future__ import annotations

import functools

import pytest

from megalm.testing.parity import REFERENCE, Layout, max_relative_difference, run_layout
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


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-mask"])
def test_context_parallel_matches_one_process(short_doc_shards, masked):
    # tiny has 4 heads and 2 kv heads (GQA): CP2 splits both; with TP2 as well kv heads must be 4
    mask = tuple(MASK) if masked else ()
    gqa, mha = mask, (*mask, "model.num_kv_heads=4")
    cases = [(Layout(context=2), gqa), (Layout(context=2, data=2, zero=2), gqa),
             (Layout(context=2, tensor=2, sequence_parallel=True), mha)]
    diffs = {}
    for layout, extra in cases:
        reference = _losses(REFERENCE, short_doc_shards, extra)
        diffs[layout.name] = max_relative_difference(_losses(layout, short_doc_shards, extra), reference)
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


@pytest.mark.slow
def test_context_parallel_at_zero_0_and_3(short_doc_shards):
    # ZeRO-0: DeepSpeed's own all-reduce over data x context; ZeRO-3: parameters partitioned over it
    reference = _losses(REFERENCE, short_doc_shards, ())
    diffs = {x.name: max_relative_difference(_losses(x, short_doc_shards, ()), reference)
             for x in (Layout(context=2, zero=0), Layout(context=2, zero=3))}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs
