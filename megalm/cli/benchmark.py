"""tools/benchmark.py: time N training steps of a config and print JSON (tokens/s, median step
time, TFLOP/s, MFU in both conventions, peak memory, data waiting), optionally with a same-shaped
transformers LlamaForCausalLM run interleaved step by step (`--compare-hf eager|compiled`).

    python tools/benchmark.py --config configs/bench-cpu.yaml --steps 10 --compare-hf compiled
    python tools/benchmark.py --config configs/bench-cpu.yaml data.train_prefixes=[PREFIX]   # real data
    python tools/benchmark.py --config configs/bench-gpu-1b.yaml --profile   # + top kernels of a step
    torchrun --nproc_per_node 8 tools/benchmark.py --config configs/llama-1b.yaml   # on GPUs
"""

from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from megalm.config import load_config
from megalm.errors import MegalmError, run_cli
from megalm.parallel.launch_env import discover
from megalm.perf.benchmark import benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    parser.add_argument("--compare-hf", choices=["eager", "compiled"], help="interleave transformers' Llama")
    parser.add_argument("--hf-precision", choices=["bf16", "autocast"], default="bf16",
                        help="for a bf16 run: the transformers model cast to bf16 (default, the faster peer "
                        "here) or fp32 weights under bf16 autocast")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (default: "
                        "datasheet for A100/H100/H200, else a measured bf16 matmul)")
    parser.add_argument("--profile", action="store_true", help="profile one more step: its top kernels "
                        "(GPU; CPU: operators) and the share of each kernel family, under \"profile\"")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise MegalmError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    if args.compare_hf and discover().world_size != 1:
        raise MegalmError("--compare-hf runs in one process")
    result = benchmark(cfg, steps=args.steps, warmup=args.warmup, compare_hf=args.compare_hf,
                       peak_tflops=args.peak_tflops, hf_precision=args.hf_precision, profile=args.profile)
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
