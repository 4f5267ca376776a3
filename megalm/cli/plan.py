"""tools/plan.py: per-rank memory (per ZeRO stage), FLOPs per step and step time of a config on N GPUs."""

from __future__ import annotations

import argparse
import json

from megalm.config import load_config
from megalm.errors import run_cli
from megalm.perf.plan import GIB, Plan, make_plan


def format_plan(plan: Plan, name: str) -> str:
    """The human-readable table: layout, parameters, memory per rank per ZeRO stage, FLOPs, time."""
    sp = " (sequence parallel)" if plan.sequence_parallel else ""
    cp = f" x CP{plan.context}" if plan.context > 1 else ""
    ep = f" (EP{plan.expert} of DP x CP)" if plan.expert > 1 else ""
    docs = ", attention per document" if plan.document_mask else ""
    lines = [
        f"{name} on {plan.world_size} GPUs: TP{plan.tensor}{sp}{cp} x PP{plan.pipeline} x DP{plan.data}{ep}{docs}, "
        f"ZeRO-{plan.zero_stage}{' (zero.stage 1/2 on one data-parallel rank)' if plan.zero_stage != plan.configured_zero_stage else ''}, "
        f"{plan.precision}, {plan.optimizer}{' (its matrices: one state, the momentum)' if plan.optimizer == 'muon' else ''}, "
        "activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}",
        f"batch: micro {plan.micro_batch_size} x accumulation {plan.grad_accum_steps} x DP {plan.data} = "
        f"{plan.global_batch_size} sequences of {plan.seq_len} = {plan.tokens_per_step:,} tokens/step",
        f"parameters: {plan.parameters:,} ({plan.parameters / 1e9:.3f}B); on one rank of pipeline stage "
        f"{plan.stage} ({plan.stage_blocks} blocks, padded vocabulary): {plan.rank_parameters:,}"
        + (f", of which routed experts {plan.rank_expert_parameters:,}" if plan.rank_expert_parameters else ""),
        *([f"expert all-to-all: {plan.all_to_all_bytes / GIB:.2f} GiB sent per rank per step (forward and backward)"]
          if plan.all_to_all_bytes else []),
        "",
        "memory per rank, GiB   params    grads  optimizer  activations     total",
    ]
    for s in plan.zero:
        mark = " <- this run" if s.stage == plan.zero_stage else ""
        why = ("pipeline > 1" if plan.pipeline > 1 else "optimizer.name=muon" if plan.optimizer == "muon"
               else "parallel.expert > 1")
        mark += "" if s.allowed else f" (not with {why})"
        opt = f"{s.optimizer / GIB:9.2f}" + ("*" if plan.offload_optimizer else " ")
        lines.append(f"  ZeRO-{s.stage}              {s.params / GIB:8.2f} {s.grads / GIB:8.2f} {opt}"
                     f"  {plan.activations / GIB:11.2f} {plan.rank_bytes(s.stage) / GIB:9.2f}{mark}")
    if plan.offload_optimizer:
        lines.append("  * offloaded to host memory (not in the total)")
    lines += [
        f"activations: {plan.activations_no_ckpt / GIB:.2f} GiB without checkpointing, "
        f"{plan.activations_ckpt / GIB:.2f} GiB with (SDPA/flash: no s^2 term)",
        "",
        f"FLOPs per step: {plan.flops_per_step_palm:.3e} (PaLM 6N + 12LdT), "
        f"{plan.flops_per_step_megatron:.3e} (Megatron{', with recomputation' if plan.activation_checkpointing else ''})",
        f"step time at {100 * plan.mfu:.0f}% MFU of {plan.peak_tflops:g} TFLOP/s per GPU: "
        f"{plan.step_seconds:.3f} s; {plan.steps:,} steps: {_duration(plan.total_seconds)}",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan.py", description=__doc__)
    p.add_argument("--config", required=True, help="a run config, e.g. configs/llama-7b.yaml")
    p.add_argument("--gpus", type=int, required=True, help="world size: devices in the run")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 TFLOP/s per device (default 989: H100/H200 SXM)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, FLOPs, seconds)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for training")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    plan = make_plan(cfg, a.gpus, mfu=a.mfu, peak_tflops=a.peak_tflops)
    print(json.dumps(plan.to_dict(), indent=2) if a.json else format_plan(plan, a.config))
    return 0


if __name__ == "__main__":
    run_cli(main)
