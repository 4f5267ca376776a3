"""Expert parallelism (parallel.expert): each MoE layer's experts split over ranks carved from data x
context, tokens exchanged by all-to-all, expert gradients reduced over the ranks holding the same
experts. fp32, 10 steps: every layout's per-step losses and gradient norms equal one process's to
1e-5 (the norms catch a wrong clipping norm, which the losses barely show), with the auxiliary losses
and with the expert bias; the layer itself with experts (and a whole expert rank) that get no token;
kill -9 resume under EP2 bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megalm.config import load_config
from megalm.testing.distributed import DistributedTestError, run_distributed_test
from megalm.testing.parity import REFERENCE, Layout, run_layout_ranks, train_rank
from megalm.testing.runs import REPO, assert_resumed, loss_steps, step_losses
from megalm.training.loop import train
from tests.training.test_resume import finish, kill_9, torchrun, wait_for_step

MOE_TINY = str(REPO / "configs" / "moe-tiny.yaml")
FP32_RTOL = 1e-5

pytestmark = pytest.mark.slow


def base(prefix: str, *extra: str) -> list[str]:
    # one sample per micro batch: 8 micro batches at one process, 2 per rank at data x context 4
    return [f"data.train_prefixes=[{prefix}]", "train.steps=10", "train.global_batch_size=8",
            "train.micro_batch_size=1", "train.precision=fp32", *extra]


def losses_and_norms_rank(config: str, overrides: list[str]) -> dict | None:
    """One rank of a run; rank 0 returns the step losses and gradient norms, every rank its experts' shape."""
    cfg = load_config(config, overrides)
    train(cfg)
    if dist.get_rank() != 0:
        return None
    records = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"loss": [r["loss"] for r in steps], "grad_norm": [r["grad_norm"] for r in steps]}


def run(layout: Layout, overrides: list[str]) -> dict:
    return run_layout_ranks(layout, MOE_TINY, overrides, rank=losses_and_norms_rank)[0]


def worst(got: dict, reference: dict) -> float:
    return max(abs(a - b) / abs(b) for key in ("loss", "grad_norm")
               for a, b in zip(got[key], reference[key], strict=True))


EP_LAYOUTS = [
    Layout(data=2, expert=2, zero=0), Layout(data=2, expert=2, zero=1), Layout(data=2, expert=2, zero=2),
    Layout(data=4, expert=4), Layout(data=4, expert=2, zero=1), Layout(data=4, expert=2, zero=2),
    Layout(tensor=2, data=2, expert=2, sequence_parallel=True), Layout(pipeline=2, data=2, expert=2),
    Layout(context=2, expert=2),
]


def test_expert_parallel_layouts_match_one_process_with_the_auxiliary_losses(byte_shards):
    overrides = base(byte_shards, "model.moe_aux_loss_coeff=0.1", "model.moe_z_loss_coeff=0.01")
    reference = run(REFERENCE, overrides)
    assert reference["loss"][-1] < reference["loss"][0] - 0.5  # it trains
    diffs = {layout.name: worst(run(layout, overrides), reference) for layout in EP_LAYOUTS}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


def test_expert_parallel_layouts_match_one_process_with_the_expert_bias(byte_shards):
    overrides = base(byte_shards, "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0", "model.family=none",
                     "model.moe_bias_update_rate=0.05")
    reference = run(REFERENCE, overrides)
    layouts = [Layout(data=2, expert=2, zero=0), Layout(data=4, expert=4), Layout(data=4, expert=2, zero=1),
               Layout(data=4, expert=2, zero=2),
               Layout(tensor=2, data=2, expert=2, sequence_parallel=True), Layout(pipeline=2, data=2, expert=2),
               Layout(context=2, expert=2)]
    diffs = {layout.name: worst(run(layout, overrides), reference) for layout in layouts}
    assert all(d <= FP32_RTOL for d in diffs.values()), diffs


def test_expert_parallel_with_recompute_under_tensor_sequence_and_pipeline(byte_shards):
    # activation checkpointing replays the forward: the recomputation routes the same tokens to the
    # same ranks (the all-to-alls run again, in the same order on every rank)
    overrides = base(byte_shards, "model.moe_aux_loss_coeff=0.1")
    reference = run(REFERENCE, overrides)
    layout = Layout(tensor=2, pipeline=2, data=2, expert=2, sequence_parallel=True)
    assert layout.world_size == 8
    got = run(layout, [*overrides, "model.activation_checkpointing=true"])
    assert worst(got, reference) <= FP32_RTOL


# ----------------------------------------------------------------------------- the layer


def _starved_layer(rank: int, group: dist.ProcessGroup | None) -> dict:
    """The MoE layer of 4 experts (this rank's slice under the expert group `group`) on rank `rank`'s
    inputs, which never choose experts 2 and 3: under EP2 expert rank 1 gets no token at all."""
    from megalm.config import ModelConfig
    from megalm.model.moe import MoE
    from megalm.parallel.context import TensorParallel

    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, vocab_size=11, max_seq_len=8, moe_num_experts=4,
                      moe_top_k=2, moe_ffn_hidden_size=8, ffn_hidden_size=8)
    moe = MoE(cfg, TensorParallel.build(None, expert=group), torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).abs())
        moe.router.weight[2:] *= -1  # positive inputs: experts 2 and 3 score lowest, never chosen
    x = torch.rand(2, 4, 16, generator=torch.Generator().manual_seed(2 + rank)).add_(0.1).requires_grad_()
    y = moe(x)
    y.square().sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "w1_grad": moe.experts.w1.grad, "w2_grad": moe.experts.w2.grad}


def _starved_layer_rank() -> dict:
    return _starved_layer(dist.get_rank(), dist.new_group([0, 1]))


def test_experts_and_a_whole_expert_rank_that_get_no_token():
    ranks = run_distributed_test(_starved_layer_rank, 2)
    one = [_starved_layer(r, None) for r in range(2)]  # the whole layer on what each rank saw
    assert [tuple(r["w1_grad"].shape) for r in ranks] == [(2, 16, 16), (2, 16, 16)]  # 2 of the 4 experts each
    for r in range(2):
        torch.testing.assert_close(ranks[r]["y"], one[r]["y"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ranks[r]["x_grad"], one[r]["x_grad"], rtol=1e-6, atol=1e-6)
    # an expert's gradient on its rank sums both ranks' tokens; rank 1's experts got none
    w1 = one[0]["w1_grad"] + one[1]["w1_grad"]
    w2 = one[0]["w2_grad"] + one[1]["w2_grad"]
    torch.testing.assert_close(ranks[0]["w1_grad"], w1[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["w2_grad"], w2[:2], rtol=1e-5, atol=1e-6)
    assert torch.equal(w1[2:], torch.zeros(2, 16, 16)) and torch.equal(ranks[1]["w1_grad"], torch.zeros(2, 16, 16))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("zero", [0, 1])
def test_kill_9_then_resume_under_expert_parallel_is_bit_identical(byte_shards, tmp_path, zero):
    # EP2 over data 2: each rank's experts come back from its own expert rank's file (ZeRO-0: with their
    # Adam moments; ZeRO-1: the moments from each rank's optimizer partition), the expert bias with them
    args = ["train.micro_batch_size=1", "train.global_batch_size=16", "train.eval_interval=0", "train.precision=fp32",
            "logging.tensorboard=false", "train.steps=12", "checkpoint.interval=6", "parallel.expert=2",
            f"zero.stage={zero}", "model.family=none", "model.moe_bias_update_rate=0.05", "model.moe_aux_loss_coeff=0.1"]
    straight = tmp_path / "straight"
    finish(torchrun(straight, byte_shards, *args, config=MOE_TINY), straight)
    killed = tmp_path / "killed"
    proc = torchrun(killed, byte_shards, *args, config=MOE_TINY)
    wait_for_step(killed, proc, 7)
    kill_9(proc)
    assert (killed / "checkpoints" / "latest").read_text() == "global_step6"
    ckpt = killed / "checkpoints" / "global_step6"
    assert sorted(p.name for p in ckpt.glob("experts_*")) == ["experts_ep00_mp_rank_00.pt", "experts_ep01_mp_rank_00.pt"]
    before = len(loss_steps(killed))
    finish(torchrun(killed, byte_shards, *args, config=MOE_TINY), killed)
    assert_resumed(killed, before, 6, 12)
    a, b = step_losses(straight), step_losses(killed)
    assert [b[s] for s in range(7, 13)] == [a[s] for s in range(7, 13)]  # bit-identical


def test_another_expert_layout_is_refused_with_the_conversion(byte_shards, tmp_path):
    common = [f"data.train_prefixes=[{byte_shards}]", "train.micro_batch_size=1", "train.global_batch_size=4",
              "train.precision=fp32", "logging.tensorboard=false", "train.eval_interval=0", f"train.run_dir={tmp_path}",
              "model.family=none"]
    run_distributed_test(train_rank, 2, args=(MOE_TINY, [*common, "train.steps=2", "parallel.expert=2"]),
                         env={"DS_ACCELERATOR": "cpu"})
    with pytest.raises(DistributedTestError) as refused:
        run_distributed_test(train_rank, 2, args=(MOE_TINY, [*common, "train.steps=3"]), env={"DS_ACCELERATOR": "cpu"})
    assert ("the checkpoint was written at parallel.expert=2, this run has parallel.expert=1: convert it: python "
            "tools/convert_checkpoint.py universal") in str(refused.value)
    assert loss_steps(tmp_path) == [1, 2]  # nothing trained


# ----------------------------------------------------------------------------- converters and universal


def _read_rank(path: str) -> dict:
    from megalm.convert.reader import CheckpointReader, open_checkpoint

    reader = CheckpointReader(open_checkpoint(path, optimizer=True))
    return {"keys": {reader.keys(n) for n in reader.specs}, "step": reader.step(), "buffers": reader.buffers(),
            "state": {(n, k): reader.full(n, k) for n in reader.specs for k in reader.keys(n)}}


@pytest.mark.parametrize("zero", [0, 1])
def test_the_reader_joins_the_expert_ranks(byte_shards, tmp_path, zero):
    # the same 3 steps at EP2 and at EP1 (both data parallel 2): every parameter's fp32 master and Adam
    # moments read from the EP2 checkpoint (experts from each expert rank's file or ZeRO partitions) equal
    # the EP1 checkpoint's; and the expert bias buffer comes along
    common = [f"data.train_prefixes=[{byte_shards}]", "train.micro_batch_size=1", "train.global_batch_size=4",
              "train.precision=fp32", "logging.tensorboard=false", "train.eval_interval=0", "train.steps=3",
              f"zero.stage={zero}", "model.family=none", "model.moe_bias_update_rate=0.05"]
    read = {}
    for ep in (1, 2):
        run_dir = tmp_path / f"ep{ep}"
        run_distributed_test(train_rank, 2, args=(MOE_TINY, [*common, f"train.run_dir={run_dir}", f"parallel.expert={ep}"]),
                             env={"DS_ACCELERATOR": "cpu"})
        read[ep] = _read_rank(str(run_dir))
    assert read[2]["keys"] == read[1]["keys"] == {("fp32", "exp_avg", "exp_avg_sq")} and read[2]["step"] == 3
    assert read[2]["state"].keys() == read[1]["state"].keys()
    for key, value in read[1]["state"].items():  # the runs differ by summation order (~1e-5 of a tensor's
        got = read[2]["state"][key]                # largest entry after 3 Adam steps); an expert misplaced, by ~1
        assert got.shape == value.shape and (got - value).abs().max() <= 1e-3 * value.abs().max(), key
    assert read[2]["buffers"].keys() == read[1]["buffers"].keys() and len(read[1]["buffers"]) == 2
    for name, value in read[1]["buffers"].items():
        assert torch.equal(read[2]["buffers"][name], value) and value.abs().sum() > 0, name


def test_universal_checkpoints_carry_the_experts_across_expert_layouts(byte_shards, tmp_path):
    # EP2 -> EP1 and EP1 -> EP4: stopped at step 5, converted, resumed at the other expert layout with the
    # optimizer and the expert bias; steps 6-10 equal the uninterrupted run's (fp32, 1e-5)
    import subprocess
    import sys

    bias = base(byte_shards, "model.family=none", "model.moe_bias_update_rate=0.05", "model.moe_aux_loss_coeff=0.1",
                "schedule.kind=constant")
    whole = run(REFERENCE, bias)["loss"]
    for name, (before, after) in {"ep2-ep1": (Layout(data=2, expert=2), Layout(data=2, zero=2)),
                                  "ep1-ep4": (Layout(data=2), Layout(data=4, expert=4, zero=2))}.items():
        run_dir, universal = tmp_path / name, tmp_path / f"{name}-universal"
        first = [*bias, *before.overrides(), f"train.run_dir={run_dir}", "train.steps=5", "checkpoint.save_at_end=true",
                 "logging.console=false", "logging.tensorboard=false", "train.eval_interval=0"]
        run_distributed_test(train_rank, before.world_size, args=(MOE_TINY, first), env={"DS_ACCELERATOR": "cpu"})
        r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "universal", "--checkpoint",
                            str(run_dir), "--output", str(universal)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        resumed_dir = tmp_path / f"{name}-resumed"
        second = [*bias, *after.overrides(), f"train.run_dir={resumed_dir}", f"checkpoint.load={universal}",
                  "checkpoint.save_at_end=false", "logging.console=false", "logging.tensorboard=false",
                  "train.eval_interval=0"]
        run_distributed_test(train_rank, after.world_size, args=(MOE_TINY, second), env={"DS_ACCELERATOR": "cpu"})
        resumed = step_losses(resumed_dir)
        assert sorted(resumed) == list(range(6, 11)), (name, resumed)
        worst_step = max(abs(resumed[s] - whole[s - 1]) / whole[s - 1] for s in range(6, 11))
        assert worst_step <= FP32_RTOL, (name, worst_step)


def test_to_hf_exports_an_expert_parallel_checkpoint(byte_shards, tmp_path):
    # Qwen3-MoE trained at EP2: to-hf joins the expert ranks (its own check compares transformers'
    # logits with megalm's on the exported weights); expert 5 lived on expert rank 1
    import subprocess
    import sys

    from safetensors.torch import load_file

    from megalm.convert.reader import CheckpointReader, open_checkpoint

    run_dir = tmp_path / "run"
    overrides = [f"data.train_prefixes=[{byte_shards}]", "train.micro_batch_size=1", "train.global_batch_size=4",
                 "train.precision=fp32", "logging.tensorboard=false", "train.eval_interval=0", "train.steps=2",
                 f"train.run_dir={run_dir}", "parallel.expert=2"]
    run_distributed_test(train_rank, 2, args=(MOE_TINY, overrides), env={"DS_ACCELERATOR": "cpu"})
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "to-hf", "--checkpoint",
                        str(run_dir), "--output", str(tmp_path / "hf")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expert5 = CheckpointReader(open_checkpoint(run_dir)).full("blocks.1.mlp.experts.w2")[5]
    torch.testing.assert_close(exported["model.layers.1.mlp.experts.5.down_proj.weight"].float(), expert5)
