"""Muon's update (megalm.training.muon) against a plain single-process Muon written here from the
published algorithm (Keller Jordan's quintic Newton-Schulz, Moonlight's 0.2 sqrt(max(rows, cols))
scale), on whole matrices and on tensor-parallel shards gathered over two ranks."""

from __future__ import annotations

import math

import pytest
import torch

from megalm.parallel.layers import shard_tensor
from megalm.testing.distributed import run_distributed_test
from megalm.training.muon import (
    LogicalSplit,
    MuonMatrix,
    newton_schulz,
    orthogonalized,
    owners,
    sharded_updates,
)

HEADS, KV, HEAD_DIM, D, FFN = 4, 2, 8, 16, 24


def plain_muon(m: torch.Tensor) -> torch.Tensor:
    """The reference: normalise, five quintic steps (a, b, c) = (3.4445, -4.7750, 2.0315) on the wide side, scale."""
    x = m.double()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return (x.T if tall else x) * 0.2 * math.sqrt(max(m.shape))


def reference_qkv(w: torch.Tensor) -> torch.Tensor:
    """q, k and v rows picked out by hand (per kv head: 2 query heads, then k, then v), each orthogonalised."""
    per = HEADS // KV + 2
    rows = {name: [g * per * HEAD_DIM + j * HEAD_DIM + r for g in range(KV) for j in js for r in range(HEAD_DIM)]
            for name, js in (("q", range(HEADS // KV)), ("k", [HEADS // KV]), ("v", [HEADS // KV + 1]))}
    out = torch.empty_like(w, dtype=torch.float64)
    for idx in rows.values():
        out[idx] = plain_muon(w[idx])
    return out


def matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"qkv": torch.randn((HEADS + 2 * KV) * HEAD_DIM, D, generator=g),
            "fc1": torch.randn(2 * FFN, D, generator=g), "fc2": torch.randn(D, FFN, generator=g)}


def references() -> dict[str, torch.Tensor]:
    w = matrices()
    gate, up = w["fc1"].chunk(2)
    return {"qkv": reference_qkv(w["qkv"]), "fc1": torch.cat([plain_muon(gate), plain_muon(up)]),
            "fc2": plain_muon(w["fc2"])}


SPLITS = {"qkv": LogicalSplit.qkv(HEADS, KV, HEAD_DIM), "fc1": LogicalSplit.halves(), "fc2": LogicalSplit.whole()}
SHARDING = {"qkv": (0, 1), "fc1": (0, 2), "fc2": (1, 1)}  # megalm's: qkv by kv groups, fc1 [gate; up] stride 2, fc2 by columns


def test_newton_schulz_makes_the_singular_values_near_one():
    s = torch.linalg.svdvals(newton_schulz(torch.randn(32, 48, generator=torch.Generator().manual_seed(1))))
    assert 0.6 < s.min() and s.max() < 1.25  # the quintic's band (not exactly 1: by design)


def test_a_whole_fused_matrix_is_orthogonalised_per_logical_matrix():
    w, ref = matrices(), references()
    for name in w:
        torch.testing.assert_close(orthogonalized(w[name], SPLITS[name]).double(), ref[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(orthogonalized(w["fc1"], LogicalSplit.whole()).double(), ref["fc1"], atol=1e-3)


def _sharded_rank(world: int) -> tuple[dict[str, torch.Tensor], int]:
    import torch.distributed as dist

    import megalm.training.muon as muon

    group, rank, calls = dist.new_group(list(range(world))), dist.get_rank(), []
    plain = muon.newton_schulz
    muon.newton_schulz = lambda g, *a, **k: calls.append(g.shape) or plain(g, *a, **k)
    w = matrices()
    items = [(shard_tensor(w[name], SHARDING[name][0], rank, world, SHARDING[name][1]),
              MuonMatrix(SPLITS[name], *SHARDING[name])) for name in w]
    items.append((w["fc2"].clone(), MuonMatrix(SPLITS["fc2"], -1, 1)))  # a matrix every rank holds whole
    out = sharded_updates(items, group)
    muon.newton_schulz = plain
    return {**dict(zip(w, out, strict=False)), "whole": out[-1]}, len(calls)


@pytest.mark.parametrize("world", [2, 4])
def test_a_tensor_parallel_shard_gets_its_slice_of_the_whole_matrix_update(world):
    # at TP4 one rank owns none of the three sharded matrices (nothing to send back: the empty case)
    ranks = run_distributed_test(_sharded_rank, world, args=(world,))
    for name, ref in references().items():
        dim, stride = SHARDING[name]
        for rank, (got, _) in enumerate(ranks):
            torch.testing.assert_close(got[name].double(), shard_tensor(ref, dim, rank, world, stride), rtol=1e-4, atol=1e-5)
    for got, _ in ranks:
        torch.testing.assert_close(got["whole"].double(), references()["fc2"], rtol=1e-4, atol=1e-5)
    # the Newton-Schulz work is spread: each sharded logical matrix (q, k, v, gate, up, fc2: 6) on one rank,
    # the whole one on every rank
    assert sum(calls for _, calls in ranks) == 6 + world, [calls for _, calls in ranks]
    # orthogonalising the shard instead (what a layout-blind Muon does) is another update
    w = shard_tensor(matrices()["fc2"], 1, 0, 2)
    assert not torch.allclose(orthogonalized(w, LogicalSplit.whole()).double(),
                              shard_tensor(references()["fc2"], 1, 0, 2), atol=1e-2)


def test_matrices_go_to_the_least_loaded_rank_largest_first():
    assert owners([5, 9, 4, 4, 1], 2) == [1, 0, 1, 0, 1]  # 9 -> 0, 5 -> 1, 4 -> 1 (5 < 9), 4 -> 0 (a tie), 1 -> 1 (9 < 13)
    assert owners([3, 3], 4) == [0, 1]


# ----------------------------------------------------------------------------- the optimizer


def test_the_optimizer_gives_matrices_muon_and_the_rest_torchs_adamw():
    from megalm.config import OptimizerConfig, load_config
    from megalm.model.gpt import GPT
    from megalm.parallel.context import TensorParallel
    from megalm.testing.runs import TINY
    from megalm.training.optimizer import build_optimizer, param_groups

    cfg = load_config(TINY).model
    opt_cfg = OptimizerConfig(name="muon", lr=0.01, weight_decay=0.1)
    torch.manual_seed(0)
    model = GPT(cfg, TensorParallel.build(None))
    twin = GPT(cfg, TensorParallel.build(None))
    twin.load_state_dict(model.state_dict())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    build_optimizer(model, opt_cfg, model_cfg=cfg).step()
    torch.optim.AdamW(param_groups(twin, opt_cfg), lr=0.01, betas=(0.9, 0.95), eps=1e-8).step()
    adamw = dict(twin.named_parameters())
    muon = {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}
    for name, p in model.named_parameters():
        if name.replace("blocks.1.", "blocks.0.") in muon:
            g = p.grad.double()
            u = g + 0.95 * g  # Nesterov on a zero momentum buffer: g + mu (mu 0 + g)
            if "qkv" in name:
                update = reference_qkv_of(u, cfg)
            elif "fc1" in name:  # [gate; up]
                update = torch.cat([plain_muon(h) for h in u.chunk(2)])
            else:
                update = plain_muon(u)
            expected = before[name].double() * (1 - 0.01 * 0.1) - 0.01 * update
            torch.testing.assert_close(p.double(), expected, rtol=1e-4, atol=1e-6, msg=name)
        else:  # embedding, head, norms: torch's AdamW exactly
            torch.testing.assert_close(p, adamw[name], rtol=1e-6, atol=1e-7, msg=name)


def reference_qkv_of(w: torch.Tensor, cfg) -> torch.Tensor:  # noqa: ANN001
    per, hd = cfg.num_heads // cfg.num_kv_heads + 2, cfg.head_dim
    out = torch.empty_like(w)
    for js in (range(per - 2), [per - 2], [per - 1]):
        idx = [g * per * hd + j * hd + r for g in range(cfg.num_kv_heads) for j in js for r in range(hd)]
        out[idx] = plain_muon(w[idx])
    return out


# ----------------------------------------------------------------------------- every layout

MUON = ["optimizer.name=muon", "train.steps=10", "train.global_batch_size=8", "train.micro_batch_size=1",
        "train.precision=fp32", "zero.stage=0", "optimizer.lr=0.01"]


@pytest.mark.slow
def test_muon_trains_the_same_model_at_every_layout(byte_shards):
    from megalm.testing.parity import Layout, max_relative_difference, run_layout
    from megalm.testing.runs import REPO, TINY

    overrides = [f"data.train_prefixes=[{byte_shards}]", *MUON]
    ZERO0 = Layout(zero=0)  # noqa: N806 - the one-process reference at ZeRO-0
    reference = run_layout(ZERO0, TINY, overrides)
    adamw = run_layout(ZERO0, TINY, [*overrides, "optimizer.name=adamw"])
    assert max_relative_difference(adamw, reference) > 1e-3  # Muon is another optimizer
    layouts = [Layout(tensor=2, zero=0), Layout(tensor=2, sequence_parallel=True, zero=0), Layout(data=2, zero=0),
               Layout(context=2, zero=0)]
    diffs = {layout.name: max_relative_difference(run_layout(layout, TINY, overrides), reference) for layout in layouts}
    # ZeRO 1/2: three layers, so that a matrix lies across the two ranks' partitions (two layers split
    # between matrices: a Muon of each rank's own elements only would pass there; 7.9e-5 here)
    three = [*overrides, "model.num_layers=3"]
    reference_three = run_layout(ZERO0, TINY, three)
    for layout in (Layout(data=2, zero=1), Layout(data=2, zero=2), Layout(tensor=2, data=2, zero=1)):
        diffs[layout.name] = max_relative_difference(run_layout(layout, TINY, three), reference_three)
    for layout in (Layout(pipeline=2, zero=0), Layout(tensor=2, pipeline=2, zero=0), Layout(tensor=2, pipeline=2, zero=1)):
        diffs[layout.name] = max_relative_difference(run_layout(layout, TINY, overrides), reference)
    # TP4 needs 4 kv heads: against its own reference
    four = [*overrides, "model.num_kv_heads=4"]
    diffs["TP4"] = max_relative_difference(run_layout(Layout(tensor=4, zero=0), TINY, four),
                                           run_layout(ZERO0, TINY, four))
    # experts: each its own matrix, under expert and tensor parallelism
    moe = str(REPO / "configs" / "moe-tiny.yaml")
    moe_reference = run_layout(ZERO0, moe, overrides)
    for layout in (Layout(data=2, expert=2, zero=0), Layout(tensor=2, data=2, expert=2, sequence_parallel=True, zero=0),
                   Layout(data=4, expert=2, zero=1), Layout(data=4, expert=2, zero=2)):
        diffs["moe " + layout.name] = max_relative_difference(run_layout(layout, moe, overrides), moe_reference)
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # bf16 with fp32 masters (ZeRO-1's partitions, on one rank too): the fp32 model within the bf16 tolerance of
    # the parity tests (3e-4 here; AdamW 7e-4)
    bf16 = {layout.name: max_relative_difference(run_layout(layout, TINY, [*overrides, "train.precision=bf16"]), reference)
            for layout in (Layout(zero=1), Layout(data=2, zero=1))}
    assert all(d <= 2e-2 for d in bf16.values()), bf16


@pytest.mark.slow
def test_muon_momentum_resumes_and_another_optimizer_is_refused(byte_shards, tmp_path):
    # stopped at step 5 and resumed at DP2 ZeRO-0: steps 6-10 bit-identical to the uninterrupted run (the
    # momentum buffers come back); resuming it with AdamW is one line unless the optimizer is reset
    from megalm.testing.distributed import DistributedTestError, run_distributed_test
    from megalm.testing.parity import train_rank
    from megalm.testing.runs import TINY, step_losses

    run = [f"data.train_prefixes=[{byte_shards}]", *MUON, "schedule.kind=constant", "logging.console=false",
           "logging.tensorboard=false", "train.eval_interval=0"]
    env = {"DS_ACCELERATOR": "cpu"}
    run_distributed_test(train_rank, 2, args=(TINY, [*run, f"train.run_dir={tmp_path / 'whole'}"]), env=env)
    stopped = [*run, f"train.run_dir={tmp_path / 'stopped'}", "checkpoint.interval=5"]
    run_distributed_test(train_rank, 2, args=(TINY, [*stopped, "train.steps=5", "checkpoint.save_at_end=true"]), env=env)
    with pytest.raises(DistributedTestError) as refused:
        run_distributed_test(train_rank, 2, args=(TINY, [*stopped, "optimizer.name=adamw"]), env=env)
    assert "written with optimizer.name=muon, this run has optimizer.name=adamw" in str(refused.value)
    assert "checkpoint.reset_optimizer=true" in str(refused.value)
    run_distributed_test(train_rank, 2, args=(TINY, stopped), env=env)
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(tmp_path / "stopped")
    assert [resumed[s] for s in range(6, 11)] == [whole[s] for s in range(6, 11)]


@pytest.mark.slow
def test_universal_checkpoints_and_reshard_carry_the_momentum_across_layouts(byte_shards, tmp_path):
    # stopped at step 5 at TP2 x PP2 (ZeRO-1), converted to a universal checkpoint and resumed at DP2
    # ZeRO-1, or resharded to TP2 and resumed there: steps 6-10 equal the uninterrupted one-process
    # run's (fp32, 1e-5). The universal checkpoint holds each Muon matrix's momentum, the rest Adam's
    # moments; resumed with AdamW it is one line
    import subprocess
    import sys

    from megalm.convert.reader import universal_state_file
    from megalm.testing.distributed import DistributedTestError
    from megalm.testing.parity import train_rank
    from megalm.testing.runs import REPO, TINY, step_losses

    quiet = ["logging.console=false", "logging.tensorboard=false", "train.eval_interval=0", "schedule.kind=constant"]
    common = [f"data.train_prefixes=[{byte_shards}]", *MUON, *quiet]
    env = {"DS_ACCELERATOR": "cpu"}
    run_distributed_test(train_rank, 1, args=(TINY, [*common, f"train.run_dir={tmp_path / 'whole'}"]), env=env)
    whole = step_losses(tmp_path / "whole")
    stopped = [*common, "parallel.tensor=2", "parallel.pipeline=2", "zero.stage=1", "train.steps=5",
               "checkpoint.save_at_end=true", f"train.run_dir={tmp_path / 'stopped'}"]
    run_distributed_test(train_rank, 4, args=(TINY, stopped), env=env)

    def tool(*args: str) -> None:
        r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]

    universal = tmp_path / "universal"
    tool("universal", "--checkpoint", str(tmp_path / "stopped"), "--output", str(universal))
    ckpt = universal / "global_step5"
    assert universal_state_file(ckpt, "blocks.0.attn.qkv.weight", "momentum_buffer").is_file()
    assert not universal_state_file(ckpt, "blocks.0.attn.qkv.weight", "exp_avg").is_file()
    assert universal_state_file(ckpt, "embedding.word.weight", "exp_avg_sq").is_file()
    resumed = {}
    for name, layout in {"dp2": ["zero.stage=1"], "adamw": ["optimizer.name=adamw"]}.items():
        second = [*common, *layout, f"checkpoint.load={universal}", f"train.run_dir={tmp_path / name}"]
        if name == "adamw":
            with pytest.raises(DistributedTestError) as refused:
                run_distributed_test(train_rank, 1, args=(TINY, second), env=env)
            assert "written with optimizer.name=muon, this run has optimizer.name=adamw" in str(refused.value)
            continue
        run_distributed_test(train_rank, 2, args=(TINY, second), env=env)
        resumed[name] = step_losses(tmp_path / name)
    tool("reshard", "--checkpoint", str(tmp_path / "stopped"), "--output", str(tmp_path / "tp2"), "--tp", "2", "--pp", "1")
    run_distributed_test(train_rank, 2, args=(TINY, [*common, "parallel.tensor=2", "zero.stage=1", f"train.run_dir={tmp_path / 'tp2'}"]),
                         env=env)
    resumed["reshard tp2"] = step_losses(tmp_path / "tp2")
    for name, losses in resumed.items():
        assert sorted(losses) == list(range(6, 11)), (name, losses)
        worst = max(abs(losses[s] - whole[s]) / whole[s] for s in range(6, 11))
        assert worst <= 1e-5, (name, worst)
