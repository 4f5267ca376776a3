"""Pure-logic parts of the trainer: schedules, the DeepSpeed dict, parameter groups, checkpoint paths."""

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.training.checkpoint import list_checkpoints, resolve_load
from megalm.training.ds_config import deepspeed_config
from megalm.training.metrics import MetricsLogger, Throughput
from megalm.training.optimizer import GuardedAdamW, param_groups
from megalm.training.schedule import LRSchedule, build_scheduler
from megalm.training.signals import PreemptionFlag

TINY = "configs/tiny.yaml"


def sched(kind, warmup=2, decay=None, steps=10, lr=1.0, min_lr=0.1):
    cfg = load_config(TINY, [f"schedule.kind={kind}", f"schedule.warmup_steps={warmup}", f"train.steps={steps}",
                             f"optimizer.lr={lr}", f"optimizer.min_lr={min_lr}"]
                      + ([f"schedule.decay_steps={decay}"] if decay is not None else [])).validate(1)
    return LRSchedule(cfg.schedule, cfg.optimizer, cfg.train.steps)


def test_cosine_schedule_values():
    s = sched("cosine")  # warmup 2, decay 8 steps
    assert [s.lr_at(i) for i in range(2)] == [0.5, 1.0]
    assert s.lr_at(2) == pytest.approx(1.0)
    assert s.lr_at(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(10) == pytest.approx(0.1) and s.lr_at(50) == pytest.approx(0.1)


def test_constant_and_wsd_schedules():
    c = sched("constant")
    assert [c.lr_at(i) for i in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    w = sched("wsd", warmup=2, decay=4, steps=10)  # stable until step 6, then 4 decay steps
    assert [w.lr_at(i) for i in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1])


def test_scheduler_drives_optimizer():
    cfg = load_config(TINY).validate(1)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(opt, cfg.schedule, cfg.optimizer, cfg.train.steps)
    s = LRSchedule(cfg.schedule, cfg.optimizer, cfg.train.steps)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([s.lr_at(i) for i in range(4)])


def test_deepspeed_dict():
    cfg = load_config(TINY, ["zero.stage=2", "train.precision=bf16", "train.global_batch_size=16",
                             "zero.offload_optimizer=true"]).validate(world_size=2)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["gradient_clipping"] == 1.0
    fp16 = deepspeed_config(load_config(TINY, ["train.precision=fp16"]).validate(1))
    assert fp16["fp16"]["loss_scale"] == 0  # dynamic
    json.dumps(ds)  # plain JSON


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_param_groups_decay_only_matrices():
    cfg = load_config(TINY).validate(1).optimizer
    m = Tiny()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(m, cfg)}
    assert groups["decay"] == {id(m.proj.weight)}
    assert groups["no_decay"] == {id(m.embedding.weight), id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}


def test_guarded_adamw_skips_non_finite():
    p = nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.overflow and torch.equal(p.data, torch.ones(3))
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and (p.data < 1).all()


def test_resolve_load(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_load("auto", root) is None
    assert resolve_load("none", root) is None
    (root / "global_step10").mkdir(parents=True)
    (root / "global_step20").mkdir()
    assert resolve_load("auto", root) is None  # no `latest`: nothing complete to resume
    (root / "latest").write_text("global_step20")
    assert resolve_load("auto", root) == (root, "global_step20")
    assert resolve_load(str(root), tmp_path) == (root, "global_step20")
    assert resolve_load(str(root / "global_step10"), tmp_path) == (root, "global_step10")
    assert [s for s, _ in list_checkpoints(root)] == [10, 20]
    with pytest.raises(MegalmError, match="not a checkpoint"):
        resolve_load(str(tmp_path / "nope"), root)


def test_throughput_and_mfu():
    t = Throughput(flops_per_token=6e9, flops_per_token_megatron=7e9, world_size=2, peak_tflops=100.0)
    m = t.step_metrics(tokens=20000, seconds=2.0)
    assert m["tokens_per_s"] == 10000
    assert m["tflops"] == pytest.approx(10000 * 6e9 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops"] / 100) and m["mfu_megatron"] > m["mfu"]


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, console=False, total_steps=2)
    log.log(1, {"loss": 2.5, "lr": 0.1, "grad_norm": float("inf")})
    log.log(2, {"val_loss": 2.0, "val_ppl": math.exp(2.0)})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": "inf"}
    assert lines[1]["val_ppl"] == pytest.approx(math.exp(2.0))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.5]
    assert acc.Scalars("eval/val_loss")[0].step == 2


def test_preemption_flag():
    flag = PreemptionFlag().install()
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop() and flag.received == signal.SIGUSR1
    finally:
        flag.uninstall()


def test_host_copies_are_detached_and_reused_from_save_to_save():
    from collections import OrderedDict

    from megalm.training.async_save import HostCopies

    weights, moments = torch.randn(4, 3), torch.randn(5)
    state = {"module": OrderedDict(w=weights), "optimizer": [moments, (moments, "adam")], "step": 7}
    copies = HostCopies()
    first = copies.snapshot(state, "model_states.pt")
    assert isinstance(first["module"], OrderedDict) and first["step"] == 7 and first["optimizer"][1][1] == "adam"
    saved = weights.clone()
    weights.add_(1.0)  # training goes on: the snapshot keeps the values of the save
    assert torch.equal(first["module"]["w"], saved) and torch.equal(first["optimizer"][0], moments)
    second = copies.snapshot(state, "model_states.pt")
    assert torch.equal(second["module"]["w"], weights)
    assert second["module"]["w"].data_ptr() == first["module"]["w"].data_ptr()  # the same host buffer
    other = copies.snapshot({"w": torch.zeros(2)}, "optim_states.pt")  # another file: its own buffers
    assert other["w"].data_ptr() not in {t.data_ptr() for t in copies.by_file["model_states.pt"]}
    grown = copies.snapshot({"w": torch.ones(3)}, "optim_states.pt")  # a new shape: a new buffer
    assert grown["w"].shape == (3,) and torch.equal(grown["w"], torch.ones(3))
    reserved = HostCopies()  # reserved ahead of the first save (and mapped by touch): that save only copies
    reserved.reserve(state, "model_states.pt")
    reserved.touch()
    ahead = {t.data_ptr() for t in reserved.by_file["model_states.pt"]}
    first = reserved.snapshot(state, "model_states.pt")
    assert {first["module"]["w"].data_ptr(), first["optimizer"][0].data_ptr()} <= ahead
    assert torch.equal(first["module"]["w"], weights)
