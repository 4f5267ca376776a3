"""A mixture of experts (configs/moe-tiny.yaml: 8 experts, top-2, a dense first block, switch and z
losses on) trains to the same per-step losses at every layout as one process, fp32, 10 steps, 1e-5:
tensor (+ sequence) parallel experts, pipeline stages (the auxiliary losses reach the routers of
every stage through their gradient), data parallel at ZeRO 1, 2 and 3, context parallel, activation
checkpointing (the recomputation routes the same), gradient accumulation (2 micro batches per rank
everywhere). The auxiliary losses matter: without them the reference trains differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from megalm.config import load_config
from megalm.testing.parity import REFERENCE, Layout, max_relative_difference, run_layout, run_layout_ranks
from megalm.testing.runs import REPO
from megalm.training.loop import train

MOE_TINY = str(REPO / "configs" / "moe-tiny.yaml")
FP32_RTOL = 1e-5

pytestmark = pytest.mark.slow


def base(prefix: str, *extra: str) -> list[str]:
    return [f"data.train_prefixes=[{prefix}]", "train.steps=10", "train.global_batch_size=8", "train.precision=fp32",
            "model.moe_aux_loss_coeff=0.1", "model.moe_z_loss_coeff=0.01", *extra]


def metrics_rank(config: str, overrides: list[str]) -> list[dict] | None:
    cfg = load_config(config, overrides)
    train(cfg)
    if dist.get_rank() != 0:
        return None
    return [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_moe_layouts_match_one_process(byte_shards):
    reference = run_layout(REFERENCE, MOE_TINY, base(byte_shards))
    assert reference[-1] < reference[0] - 0.5  # it trains
    plain = run_layout(REFERENCE, MOE_TINY, base(byte_shards, "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"))
    assert max_relative_difference(plain, reference) > 1e-4  # the auxiliary losses change the training
    layouts = [Layout(tensor=2, sequence_parallel=True), Layout(pipeline=2), Layout(data=2, zero=1),
               Layout(data=2, zero=2), Layout(data=2, zero=3), Layout(context=2)]
    diffs = {layout.name: max_relative_difference(run_layout(layout, MOE_TINY, base(byte_shards)), reference)
             for layout in layouts}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


def test_moe_under_tensor_sequence_pipeline_with_recompute_matches_one_process(byte_shards):
    overrides = base(byte_shards)
    reference = run_layout(REFERENCE, MOE_TINY, overrides)
    layout = Layout(tensor=2, pipeline=2, sequence_parallel=True)
    losses = run_layout(layout, MOE_TINY, [*overrides, "model.activation_checkpointing=true"])
    assert max_relative_difference(losses, reference) <= FP32_RTOL


def test_moe_metrics_are_logged_per_layer(byte_shards):
    # tokens per expert (busiest and idlest over the mean), the auxiliary and z losses, the fraction dropped
    # past capacity, per MoE block, gathered from the pipeline stage that holds the block
    records = run_layout_ranks(Layout(pipeline=2), MOE_TINY, base(byte_shards, "train.steps=2", "model.moe_capacity_factor=1.0"),
                               rank=metrics_rank)[0]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        for block in (1, 2):  # block 0 is dense (moe_dense_layers: [0])
            assert r[f"moe/{block}/load_max"] >= 1.0 >= r[f"moe/{block}/load_min"] >= 0.0
            assert 0.5 < r[f"moe/{block}/aux_loss"] < 2.0  # 1 when balanced, at most E / k
            assert r[f"moe/{block}/z_loss"] > 0
            assert 0 <= r[f"moe/{block}/dropped"] < 0.5  # capacity 1.0: only what the busiest experts overflow
        assert "moe/0/load_max" not in r
