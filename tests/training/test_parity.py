"""Every parallel layout trains the tiny run to the same per-step losses as one process."""

import pytest

from megalm.testing.parity import LAYOUTS, REFERENCE, Layout, max_relative_difference, run_layout
from megalm.testing.runs import TINY

FP32_RTOL = 1e-5
BF16_RTOL = 2e-2  # bf16 sums in a different order per layout; stated tolerance on the loss


def base(prefix: str, *extra: str) -> list[str]:
    return [f"data.train_prefixes=[{prefix}]", "train.steps=10", "train.global_batch_size=8",
            "train.precision=fp32", *extra]


@pytest.mark.slow
def test_every_layout_matches_reference_vocab_not_divisible(byte_shards):
    # byte vocab 257 is not divisible by the tensor size (padded to 384 under TP2)
    overrides = base(byte_shards)
    reference = run_layout(REFERENCE, TINY, overrides)
    assert reference[-1] < reference[0] - 0.5  # it trains
    diffs = {layout.name: max_relative_difference(run_layout(layout, TINY, overrides), reference)
             for layout in LAYOUTS}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


@pytest.mark.slow
def test_tensor_layouts_match_reference_vocab_divisible(byte_shards):
    overrides = base(byte_shards, "model.vocab_size=320", "model.tie_embeddings=true")
    reference = run_layout(REFERENCE, TINY, overrides)
    for layout in (Layout(tensor=2), Layout(tensor=2, pipeline=2), Layout(tensor=2, data=2, zero=3)):
        assert max_relative_difference(run_layout(layout, TINY, overrides), reference) <= FP32_RTOL, layout
    # the pipeline's loss: logits then loss (unfused), and the fused loss in several chunks
    for extra in ("model.loss_chunk_tokens=0", "model.loss_chunk_tokens=100"):
        losses = run_layout(Layout(tensor=2, pipeline=2), TINY, [*overrides, extra])
        assert max_relative_difference(losses, reference) <= FP32_RTOL, extra


@pytest.mark.slow
def test_bf16_layouts_within_stated_tolerance(byte_shards):
    overrides = base(byte_shards, "train.precision=bf16")
    reference = run_layout(REFERENCE, TINY, overrides)
    fp32 = run_layout(REFERENCE, TINY, base(byte_shards))
    assert max_relative_difference(reference, fp32) <= BF16_RTOL
    for layout in (Layout(data=2, zero=2), Layout(tensor=2), Layout(pipeline=2)):
        assert max_relative_difference(run_layout(layout, TINY, overrides), reference) <= BF16_RTOL, layout


@pytest.mark.slow
def test_zero3_partitioned_head_with_fused_loss_matches_reference(byte_shards):
    # a 4096 x 64 head is above ZeRO-3's persistence threshold (1e5 elements), so it is partitioned
    # and gathered when the fused loss reads it outside the Head's own forward
    for tie in ("false", "true"):
        overrides = base(byte_shards, "model.vocab_size=4096", f"model.tie_embeddings={tie}")
        reference = run_layout(REFERENCE, TINY, [*overrides, "model.loss_chunk_tokens=0"])
        losses = run_layout(Layout(data=2, zero=3), TINY, [*overrides, "model.loss_chunk_tokens=100"])
        assert max_relative_difference(losses, reference) <= FP32_RTOL, tie


@pytest.mark.slow
def test_sequence_parallel_under_a_pipeline_with_recompute_matches_reference(byte_shards):
    # issue 21: DeepSpeed's pipeline split each sequence-sharded activation over the tensor ranks
    # and gathered it on the next stage, mixing the ranks' parts (megalm.training.ds_config)
    layout = Layout(tensor=2, pipeline=2, sequence_parallel=True)
    reference = run_layout(REFERENCE, TINY, base(byte_shards))
    for extra in ("model.activation_checkpointing=true", "model.loss_chunk_tokens=0"):  # the same model
        losses = run_layout(layout, TINY, base(byte_shards, extra))
        assert max_relative_difference(losses, reference) <= FP32_RTOL, extra
    tied = base(byte_shards, "model.tie_embeddings=true")  # another model: its own reference
    assert max_relative_difference(run_layout(layout, TINY, tied), run_layout(REFERENCE, TINY, tied)) <= FP32_RTOL


@pytest.mark.slow
def test_scaled_rope_under_tensor_sequence_pipeline_and_context_matches_reference(byte_shards):
    # model.rope_scaling (issue 22): the model's table (one process, TP, CP) and the per-block
    # computation (pipeline stages) give the same RoPE; 64-token samples pass the 16-token original
    overrides = base(byte_shards, "model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_seq_len=16")
    reference = run_layout(REFERENCE, TINY, overrides)
    assert max_relative_difference(reference, run_layout(REFERENCE, TINY, base(byte_shards))) > 1e-4  # it matters
    for layout, extra in [(Layout(tensor=2, pipeline=2, sequence_parallel=True), "model.activation_checkpointing=true"),
                          (Layout(context=2), "model.loss_chunk_tokens=24")]:
        losses = run_layout(layout, TINY, [*overrides, extra])
        assert max_relative_difference(losses, reference) <= FP32_RTOL, layout.name


FAMILY_FEATURES = {  # issue 22: each family's features, with the sliding window and document masking
    "qwen3": ["model.family=qwen3", "model.qk_norm=true", "model.head_dim=32", "model.sliding_window=24",
              "model.document_mask=true"],
    "qwen2": ["model.family=qwen2", "model.qkv_bias=true", "model.sliding_window=24", "model.tie_embeddings=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_FEATURES)
def test_family_features_under_tensor_sequence_pipeline_and_context_match_reference(byte_shards, family):
    # qk-norm's weights are replicated over the tensor ranks, each normalising its own heads: their
    # gradients are summed (a rank's own would drift apart within 10 steps); q/k/v biases split with
    # their columns by kv group; the window's mask (with the documents') on whole sequences under CP
    overrides = base(byte_shards, *FAMILY_FEATURES[family])
    reference = run_layout(REFERENCE, TINY, overrides)
    for layout, extra in [(Layout(tensor=2, pipeline=2, sequence_parallel=True), "model.activation_checkpointing=true"),
                          (Layout(context=2), "model.loss_chunk_tokens=24")]:
        losses = run_layout(layout, TINY, [*overrides, extra])
        assert max_relative_difference(losses, reference) <= FP32_RTOL, layout.name
