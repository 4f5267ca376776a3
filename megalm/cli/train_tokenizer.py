"""tools/train_tokenizer.py: train sentencepiece (bpe|unigram) or byte-level BPE from jsonl/txt/parquet."""

from __future__ import annotations

import argparse

from megalm.data.tokenizer_training import train_tokenizer
from megalm.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Writes PREFIX.model (bpe|unigram) or PREFIX.json (bytelevel) and PREFIX.info.json.",
    )
    p.add_argument("--input", nargs="+", required=True, help="files, globs or save_to_disk folders")
    p.add_argument("--type", required=True, choices=["bpe", "unigram", "bytelevel"])
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece only; for CJK-heavy text at small vocab use 0.995 and a vocab of 4000+")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens (user-defined symbols)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    info = train_tokenizer(
        a.input, a.type, a.vocab_size, a.output_prefix, json_key=a.json_key,
        character_coverage=a.character_coverage, special_tokens=a.special_tokens,
    )
    print(f"wrote {a.output_prefix}: {info['type']} {a.type}, vocab {info['vocab_size']}, eod {info['eod']}, "
          f"fingerprint {info['fingerprint'][:16]}")
    return 0


if __name__ == "__main__":
    run_cli(main)
