"""tools/merge_datasets.py: concatenate shards (same dtype and tokenizer) into one PREFIX.bin/.idx."""

from __future__ import annotations

import argparse

from megalm.data.merge import merge_datasets
from megalm.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="merge_datasets.py", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="shard prefixes (PREFIX.bin/.idx), in order")
    p.add_argument("--output-prefix", required=True)
    a = p.parse_args(argv)
    s = merge_datasets(a.input, a.output_prefix)
    print(f"wrote {a.output_prefix}: {s['documents']} documents, {s['tokens']} tokens from {len(a.input)} shards")
    return 0


if __name__ == "__main__":
    run_cli(main)
