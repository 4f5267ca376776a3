"""Checks to run before a large allocation starts training (the launch scripts call it).

    python -m megalm.cli.preflight --config C --world-size N [--gpus-per-node G] [section.key=value ...]

It validates the config against the world size (tensor x pipeline must divide it; batch sizes must
fit) and, with --gpus-per-node, that this node sees enough GPUs. Rendezvous reachability is checked
by every rank at start-up (megalm.parallel.groups.wait_for_rendezvous), with a timeout.
"""

from __future__ import annotations

import argparse

from megalm.config import load_config
from megalm.errors import MegalmError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalm.cli.preflight")
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).validate(args.world_size)
    if args.gpus_per_node:
        import torch  # noqa: PLC0415 - heavy: a config-only preflight stays under a second

        visible = torch.cuda.device_count()
        if visible < args.gpus_per_node:
            raise MegalmError(
                f"this node sees {visible} GPUs but {args.gpus_per_node} processes per node were requested;"
                " check CUDA_VISIBLE_DEVICES and the job's GPU request"
            )
    p = cfg.parallel
    print(
        f"preflight ok: world {args.world_size} = tensor {p.tensor} x pipeline {p.pipeline} x data "
        f"{cfg.data_parallel}; global batch {cfg.train.global_batch_size} = micro "
        f"{cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x data "
        f"{cfg.data_parallel}; {cfg.train.steps} steps",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
