"""tools/parity.py: train the same run under every parallel layout and print its loss difference
against the single-process reference (TP1 PP1 DP1).

    python tools/parity.py --data-prefix PREFIX [--config configs/tiny.yaml] [--steps 10] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json

from megalm.errors import run_cli
from megalm.testing.parity import LAYOUTS, REFERENCE, max_relative_difference, run_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/parity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data-prefix", required=True, help="shard prefix to train on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    base = [f"data.train_prefixes=[{args.data_prefix}]", f"train.steps={args.steps}",
            "train.global_batch_size=8", *args.overrides]
    reference = run_layout(REFERENCE, args.config, base)
    rows = [{"layout": REFERENCE.name, "max_rel_diff": 0.0, "final_loss": reference[-1]}]
    for layout in LAYOUTS:
        losses = run_layout(layout, args.config, base)
        rows.append({"layout": layout.name, "max_rel_diff": max_relative_difference(losses, reference),
                     "final_loss": losses[-1]})
        if not args.json:
            print(f"{layout.name:<24} max relative loss difference {rows[-1]['max_rel_diff']:.2e}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
