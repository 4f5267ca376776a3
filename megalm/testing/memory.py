"""Measure what a real DeepSpeed engine allocates for parameters, gradients and optimizer states.

Used to check megalm.perf.plan against reality on CPU: build the engine exactly as training does, take
one optimizer step (so Adam's states exist), run one more forward and backward (so gradients and
optimizer states coexist, the steady-state peak of model states), then sum the bytes of the
distinct storages reachable from

    params     the module's parameters (under ZeRO 1/2 views into one flat buffer: counted once)
    grads      their .grad (or DeepSpeed's .grad_accum) tensors and ZeRO's reduced gradient
               partitions (`averaged_gradients`)
    optimizer  the torch optimizer's state (exp_avg, exp_avg_sq, step) and its own parameters
               when they are not the module's (DeepSpeed's fp32 master copies) with their .grad

Storages, not tensor views, are summed, so alignment padding of flat buffers counts as allocated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megalm.config import load_config
from megalm.training.startup import bootstrap


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not in `seen` (which is updated)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def model_state_bytes(ds_engine: object) -> dict[str, int]:
    """{"params", "grads", "optimizer"}: bytes this rank holds, as described in the module doc."""
    params = list(ds_engine.module.parameters())
    seen: set[int] = set()
    out = {"params": _storage_bytes(params, seen)}
    grads = [g for p in params for g in (p.grad, getattr(p, "grad_accum", None)) if g is not None]
    partitions = getattr(ds_engine.optimizer, "averaged_gradients", None) or {}  # ZeRO 1/2, after reduction
    grads += [g for group in partitions.values() if group for g in group if g is not None]
    out["grads"] = _storage_bytes(grads, seen)
    basic = getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer)  # unwrap ZeRO / fp16 wrappers
    masters = [p for g in basic.param_groups for p in g["params"]]
    states = [v for s in basic.state.values() for v in s.values() if torch.is_tensor(v)]
    master_grads = [p.grad for p in masters if p.grad is not None]
    out["optimizer"] = _storage_bytes([*masters, *states, *master_grads], seen)
    return out


def measure_rank(config: str, overrides: list[str]) -> dict[str, int]:
    """On an initialised process group (run_distributed_test): build the engine for
    config + overrides as training does, take one optimizer step, then one more forward/backward,
    and return model_state_bytes. With train.grad_accum_steps >= 2 that last backward is not at an
    accumulation boundary, so the full gradients are still held (ZeRO 1 and 2 free them once
    reduced into partitions at the boundary): the peak the planner counts."""
    cfg = load_config(config, overrides)
    ds = bootstrap(cfg).engine.ds
    generator = torch.Generator().manual_seed(dist.get_rank())
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len + 1)
    for micro_step in range(cfg.train.grad_accum_steps + 1):
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
        ds.backward(ds(tokens[:, :-1], tokens[:, 1:]))
        if micro_step < cfg.train.grad_accum_steps:
            ds.step()
    return model_state_bytes(ds)


def measure_cases(config: str, cases: list[list[str]]) -> list[dict[str, int]]:
    """measure_rank for several override lists in one set of spawned ranks (saves start-up time)."""
    return [measure_rank(config, overrides) for overrides in cases]
