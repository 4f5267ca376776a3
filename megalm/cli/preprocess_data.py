"""tools/preprocess_data.py: tokenize a corpus into Megatron-compatible PREFIX.bin/.idx + PREFIX.meta.json."""

from __future__ import annotations

import argparse
import sys

from megalm.data.preprocess import preprocess
from megalm.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl(.gz) / txt(.gz) / parquet / `datasets` save_to_disk folders into shards. "
        "txt: a document is a run of non-blank lines. Empty documents are skipped and counted.",
    )
    p.add_argument("--input", nargs="+", required=True, help="files, globs or save_to_disk folders")
    p.add_argument("--json-key", default="text", help="JSON key / column holding the text (default: text)")
    p.add_argument("--tokenizer-type", required=True, choices=["sentencepiece", "hf", "byte"])
    p.add_argument("--tokenizer-model", default="", help=".model (sentencepiece) or tokenizer.json (hf)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any N)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--num-shards", type=int, default=1, help="deal documents round-robin into PREFIX_00000..")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) malformed JSON, missing keys and non-UTF-8 records instead of stopping")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress on stderr (default: only when stderr is a terminal)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    s = preprocess(
        a.input, a.json_key, a.tokenizer_type, a.tokenizer_model, a.output_prefix, workers=a.workers,
        append_eod=a.append_eod, num_shards=a.num_shards, skip_bad_records=a.skip_bad_records,
        progress=a.progress,
    )
    secs = max(s["seconds"], 1e-9)
    print(
        f"wrote {', '.join(s['prefixes'])}: {s['documents']} documents, {s['tokens']} tokens, "
        f"skipped {s['skipped_empty']} empty and {s['skipped_bad']} bad records; {secs:.2f} s, "
        f"{s['documents'] / secs:,.0f} docs/s, {s['tokens'] / secs:,.0f} tokens/s",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
