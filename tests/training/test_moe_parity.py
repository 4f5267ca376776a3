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


def test_the_expert_bias_is_exact_at_every_layout_and_resumes(byte_shards, tmp_path):
    # DeepSeek-V3's auxiliary-loss-free bias (model.moe_bias_update_rate), counts over every rank that
    # saw the batch; a large rate so that it changes the routing within ten steps
    bias = base(byte_shards, "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0", "model.family=none",
                "model.moe_bias_update_rate=0.05")
    reference = run_layout(REFERENCE, MOE_TINY, bias)
    plain = run_layout(REFERENCE, MOE_TINY, [*bias, "model.moe_bias_update_rate=0"])
    assert max_relative_difference(plain, reference) > 1e-4  # the bias changes the training
    for layout in (Layout(tensor=2, sequence_parallel=True), Layout(pipeline=2), Layout(data=2, zero=1),
                   Layout(context=2)):
        assert max_relative_difference(run_layout(layout, MOE_TINY, bias), reference) <= FP32_RTOL, layout
    # stopped at step 5 and resumed at DP2: the bias comes back with the model (steps 6-10 as uninterrupted)
    constant = [*bias, "schedule.kind=constant"]  # the same rates whether the run is planned for 5 or 10 steps
    run = [*constant, f"train.run_dir={tmp_path}", "logging.console=false", "logging.tensorboard=false",
           "train.eval_interval=0", "checkpoint.interval=5"]
    from megalm.testing.distributed import run_distributed_test
    from megalm.testing.parity import train_rank

    run_distributed_test(train_rank, 2, args=(MOE_TINY, [*run, "train.steps=5", "checkpoint.save_at_end=true"]),
                         env={"DS_ACCELERATOR": "cpu"})
    run_distributed_test(train_rank, 2, args=(MOE_TINY, [*run, "checkpoint.load=auto"]), env={"DS_ACCELERATOR": "cpu"})
    from megalm.testing.runs import step_losses

    resumed = step_losses(tmp_path)
    whole = run_layout(Layout(data=2, zero=1), MOE_TINY, constant)
    assert max(abs(resumed[s] - whole[s - 1]) / whole[s - 1] for s in range(6, 11)) <= FP32_RTOL


def test_global_batch_statistics_are_the_same_at_every_layout_of_one_split(byte_shards):
    # model.moe_aux_loss_statistics=global_batch counts the step's micro batches so far on every data-parallel
    # rank: fixed data parallel 2 x 4 micro batches, any tensor / pipeline / context / expert layout, ZeRO
    # stage or recomputation trains the same model; it is not the micro batch's own statistic
    overrides = base(byte_shards, "model.moe_aux_loss_statistics=global_batch", "train.micro_batch_size=1")
    reference = run_layout(Layout(data=2), MOE_TINY, overrides)
    micro = run_layout(Layout(data=2), MOE_TINY, [*overrides, "model.moe_aux_loss_statistics=micro_batch"])
    assert max_relative_difference(micro, reference) > 1e-4
    layouts = [Layout(tensor=2, data=2, sequence_parallel=True), Layout(pipeline=2, data=2), Layout(context=2, data=2),
               Layout(data=2, expert=2), Layout(data=2, zero=2)]
    diffs = {layout.name: max_relative_difference(run_layout(layout, MOE_TINY, overrides), reference)
             for layout in layouts}
    recompute = Layout(tensor=2, pipeline=2, data=2, sequence_parallel=True)
    diffs["recompute " + recompute.name] = max_relative_difference(
        run_layout(recompute, MOE_TINY, [*overrides, "model.activation_checkpointing=true"]), reference)
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs
