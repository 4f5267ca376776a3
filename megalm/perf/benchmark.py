"""Measure training steps of a config: tokens/s, step time, TFLOP/s, MFU (both conventions), peak
memory and data waiting (the trainer's real data pipeline when data.train_prefixes is set, else
random tokens), optionally against a same-shaped transformers Llama run interleaved step
by step in the same process (the machine may be shared and noisy: compare ratios, not seconds).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megalm import seams
from megalm.config import Config
from megalm.data.packing import Collate
from megalm.parallel.groups import ProcessGroups
from megalm.training.engine import device_type
from megalm.training.loop import train_step
from megalm.training.metrics import Throughput, device_peak_tflops, memory_gib, resident_gib
from megalm.training.startup import Runtime, bootstrap


def synthetic_batches(cfg: Config, groups: ProcessGroups) -> Iterator[tuple[Any, torch.Tensor]]:
    """Endless random micro-batches, made as the trainer's loader makes them (this rank's context
    chunk; with model.document_mask, documents ended by the token id V - 1, one in 256 tokens):
    measures the model, not the data pipeline."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len + 1)
    eod = cfg.model.vocab_size - 1
    collate = Collate(eod=eod if cfg.model.document_mask else None, document_positions=cfg.model.document_positions,
                      context_rank=groups.context_rank, context_size=groups.dims.context)
    while True:
        x = torch.randint(0, cfg.model.vocab_size - 1, shape, generator=g)
        x[torch.rand(shape, generator=g) < 1 / 256] = eod
        yield collate(list(x.numpy()))


def measured_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 2048) -> float:
    """Achieved TFLOP/s of a large square matmul: a stand-in peak where no datasheet value is known."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def hf_class_name(model: Any) -> str:
    """The transformers class --compare-hf trains for this model (its family's)."""
    from megalm.convert.families import family_of  # noqa: PLC0415 - transformers' side

    return family_of(model).hf_class


def hf_step_fn(cfg: Config, compile_model: bool, precision: str = "bf16") -> Callable[[tuple[torch.Tensor, torch.Tensor]], float]:
    """A plain PyTorch training step of transformers' own class of the model's family
    (LlamaForCausalLM, Qwen3ForCausalLM, ...; megalm.convert.families) with the same config, as its
    users write it: the loss computed by the model from `labels` (so torch.compile fuses it too),
    AdamW (torch's fused kernel), gradient clipping. precision (for a bf16 run): "bf16" casts the
    model to bf16 (the faster peer here), "autocast" keeps fp32 weights under bf16 autocast."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - heavy, only with --compare-hf

    from megalm.convert.families import hf_config  # noqa: PLC0415 - transformers' side, only with --compare-hf

    hf_cfg = hf_config(cfg.model, {}, torch.float32)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").float().to(device_type())
    bf16 = cfg.train.precision == "bf16"
    if bf16 and precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, fused=True)
    autocast = bf16 and precision == "autocast"

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        tokens, labels = (x.to(device_type(), non_blocking=True) for x in batch)
        with torch.autocast(device_type(), dtype=torch.bfloat16, enabled=autocast):
            loss = seams.causal_lm_loss(forward, tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# Kernel families of a profiled step, by the first pattern a kernel's name matches (case-insensitive).
KERNEL_KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|flex"),
    ("matmul", r"aten::(mm|addmm|bmm)$|gemm|sm90_xmma|cutlass|cublas|nvjet|wgmma|matmul|splitk"),
    ("nccl", r"nccl"),
    ("triton (fused by compile)", r"^triton_"),
    ("optimizer", r"adam|multi_tensor|foreach|FusedOptimizer"),
    ("memcpy/memset", r"memcpy|memset|copy_kernel|catarray"),
    ("elementwise/reduce", r"elementwise|reduce|vectorized|softmax|norm|index|scatter|gather"),
]


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile_step(step: Callable[[], object], top: int = 30) -> dict:
    """One call of `step` under torch.profiler: the `top` kernels by GPU time (CPU: operators by
    self CPU time), each with its share of all kernel time, and the shares per kernel family."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    if cuda:
        for e in prof.events():  # kernels and copies; not the annotations (ranges that span kernels)
            if e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False) \
                    and not e.name.startswith(("Optimizer.", "## ", "ProfilerStep")):
                times[e.name] += e.time_range.elapsed_us()
                calls[e.name] += 1
    else:
        for e in prof.key_averages():
            times[e.key] += e.self_cpu_time_total
            calls[e.key] += e.count
    total = sum(times.values()) or 1.0
    kinds: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        kinds[kernel_kind(name)] += us / total
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "unit": "GPU kernels" if cuda else "CPU operators (self time)",
        "wall_ms": wall_us / 1e3, "kernel_ms": total / 1e3, "busy_fraction": total / wall_us,
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name[:160], "calls": calls[name], "ms": us / 1e3, "fraction": us / total}
                for name, us in ranked],
    }


def time_optimizer_steps(engine: Any) -> Callable[[], float]:
    """Time every step of the torch optimizer inside DeepSpeed's engine (AdamW or megalm's Muon, with
    Muon's gathers; not ZeRO's own copies and parameter all-gather around it), through torch's step
    hooks; return a function giving the seconds spent so far."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    spent, started = [0.0], [0.0]

    def pre(*_: Any) -> None:
        started[0] = time.perf_counter()

    def post(*_: Any) -> None:
        spent[0] += time.perf_counter() - started[0]

    inner.register_step_pre_hook(pre)
    inner.register_step_post_hook(post)
    return lambda: spent[0]


def benchmark(cfg: Config, *, steps: int, warmup: int, compare_hf: str | None, peak_tflops: float,
              hf_precision: str = "bf16", profile: bool = False) -> dict:
    """Run warmup + steps training steps (interleaved with the transformers step when asked), then
    with `profile` one more step under torch.profiler."""
    # enough samples (and schedule) for every step taken, the transformers steps included
    cfg.train.steps = max(cfg.train.steps, (warmup + steps) * (2 if compare_hf else 1) + int(profile))
    # real shards go through the trainer's own pipeline: sample index, DataLoader workers
    rt = bootstrap(cfg, data=bool(cfg.data.train_prefixes))
    batches = rt.data.train_batches(consumed_samples=0) if rt.data else synthetic_batches(cfg, rt.groups)
    hf = hf_step_fn(cfg, compare_hf == "compiled", hf_precision) if compare_hf else None
    times, hf_times, waits, losses, hf_losses, optimizer_times = [], [], [], [], [], []
    optimizer_seconds = time_optimizer_steps(rt.engine.ds)
    before_steps = resident_gib()  # the model, its optimizer states and the libraries, before any step
    for i in range(warmup + steps):
        t0, spent = time.perf_counter(), optimizer_seconds()
        loss, wait, _ = train_step(rt, batches)
        seconds = time.perf_counter() - t0
        if i >= warmup:
            optimizer_times.append(optimizer_seconds() - spent)
        if hf is not None:
            t1 = time.perf_counter()
            hf_loss = hf(next(batches))
            hf_seconds = time.perf_counter() - t1
        if i >= warmup:
            times.append(seconds)
            waits.append(wait)
            losses.append(loss)
            if hf is not None:
                hf_times.append(hf_seconds)
                hf_losses.append(hf_loss)
    result = _report(rt, times, waits, hf_times, losses, compare_hf, peak_tflops)
    result["optimizer"] = {"name": cfg.optimizer.name, "median_step_s": statistics.median(optimizer_times),
                           "fraction_of_step": sum(optimizer_times) / sum(times)}
    if profile:
        result["profile"] = profile_step(lambda: train_step(rt, batches))
    result["before_steps_gib"] = before_steps
    result["steps_mem_gib"] = result["peak_mem_gib"] - before_steps  # what the steps add: activations, gradients
    if hf is not None:
        result["hf"].update(precision=hf_precision if cfg.train.precision == "bf16" else cfg.train.precision,
                            final_loss=hf_losses[-1])
    return result


def _report(rt: Runtime, times: list[float], waits: list[float], hf_times: list[float],
            losses: list[float], compare_hf: str | None, peak_tflops: float) -> dict:
    cfg = rt.cfg
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    median = statistics.median(times)
    peak = device_peak_tflops(peak_tflops) or measured_peak_tflops(rt.device)
    out = {
        "config": {"hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                   "vocab_size": cfg.model.vocab_size, "seq_len": cfg.data.seq_len,
                   "micro_batch_size": cfg.train.micro_batch_size, "precision": cfg.train.precision,
                   "compile": cfg.train.compile, "world_size": rt.dims.world_size},
        "steps": len(times), "median_step_s": median, "tokens_per_s": tokens / median,
        "peak_tflops": peak, "peak_source": "given or datasheet" if device_peak_tflops(peak_tflops) else "measured matmul",
        "data": "shards" if cfg.data.train_prefixes else "synthetic",
        "data_wait_fraction": sum(waits) / sum(times), "peak_mem_gib": memory_gib(), "final_loss": losses[-1],
    }
    m = Throughput.of_run(cfg, rt.dims.world_size, peak).step_metrics(tokens, median)
    out.update({k: m[k] for k in ("tflops", "tflops_megatron", "mfu", "mfu_megatron")})
    if hf_times:
        hf_median = statistics.median(hf_times)
        out["hf"] = {"variant": compare_hf, "median_step_s": hf_median, "tokens_per_s": tokens / hf_median,
                     "class": hf_class_name(cfg.model)}
        out["speedup_vs_hf"] = hf_median / median
    if dist.is_initialized():
        dist.barrier()
    return out
