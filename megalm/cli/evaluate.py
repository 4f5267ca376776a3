"""tools/evaluate.py: loss and perplexity of a checkpoint on shards or text; BLEU/ROUGE on references; lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json

from megalm.errors import MegalmError, run_cli
from megalm.inference import evaluate as ev
from megalm.inference.generate import Sampling, generate
from megalm.inference.harness import run_tasks
from megalm.inference.load import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split(": ", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="megalm RUN_DIR, RUN_DIR/checkpoints or .../global_stepN")
    src.add_argument("--hf", help="Hugging Face model directory (llama, gpt2, qwen2, qwen3, mistral)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-prefix", help="PREFIX of a .bin/.idx shard (tokenized with the model's tokenizer)")
    data.add_argument("--text-file", help="UTF-8 text; documents separated by blank lines")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: model.max_seq_len)")
    p.add_argument("--max-tokens", type=int, default=1_000_000, help="evaluate on at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--references", help="JSONL of {\"prompt\", \"reference\"}: BLEU and ROUGE of greedy outputs")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for --references")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (pip install 'megalm[eval]')")
    p.add_argument("--include-path", help="a directory of lm-eval task YAMLs (local tasks)")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not (a.data_prefix or a.text_file or a.references or a.tasks):
        raise MegalmError("give --data-prefix, --text-file, --references or --tasks")
    model, codec = load_model(a.checkpoint, a.hf)
    seq_len = a.seq_len or model.cfg.max_seq_len
    if not 0 < seq_len <= model.cfg.max_seq_len:
        raise MegalmError(f"--seq-len must be in 1..{model.cfg.max_seq_len}, got {seq_len}")
    out: dict = {}
    if a.data_prefix or a.text_file:
        budget = a.max_tokens
        tokens = (ev.tokens_from_prefix(a.data_prefix, budget) if a.data_prefix
                  else ev.tokens_from_text(a.text_file, codec, budget))
        out.update(ev.loss_and_perplexity(model, tokens, seq_len, a.batch_size))
    if a.references:
        pairs = ev.read_references(a.references)
        prompts = [codec.encode(p) for p, _ in pairs]
        gen = generate(model, prompts, a.max_new_tokens, Sampling(greedy=True), eod=codec.eod, pad=codec.pad)
        hyps = [codec.completion(p, [t for t in new if t != codec.eod]) for p, new in zip(prompts, gen.tokens, strict=True)]
        out.update(ev.bleu_rouge(hyps, [r for _, r in pairs]))
        out["references"] = len(pairs)
    if a.tasks:
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
        out["tasks"] = run_tasks(model, codec, tasks, include_path=a.include_path, limit=a.limit,
                                 batch_size=a.batch_size)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_cli(main)
