"""Training entry point: `python -m megalm.train --config configs/tiny.yaml [section.key=value ...]`.

Runs as one process with no launcher, or under torchrun, `deepspeed --module megalm.train`,
`srun python -m megalm.train` and mpirun: the launcher is discovered from the environment.
"""

from __future__ import annotations

import argparse
import sys

from megalm.config import Config, describe, describe_markdown, load_config
from megalm.errors import run_cli
from megalm.parallel.launch_env import discover
from megalm.training.loop import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megalm.train", description="Train a GPT/Llama-style model with megalm."
    )
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--markdown", action="store_true", help="with --help-config: as docs/config.md")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """Load, override and validate the config against the launcher's world size."""
    return load_config(args.config, args.overrides).validate(discover().world_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config and args.markdown:
        print(describe_markdown())
        return 0
    if args.help_config:
        for section, keys in describe().items():
            for key, doc in keys.items():
                print(f"{section}.{key}: {doc}")
        return 0
    cfg = resolve_config(args)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    train(cfg)
    return 0  # run_cli destroys the process groups


if __name__ == "__main__":
    run_cli(main)
