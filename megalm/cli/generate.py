"""tools/generate.py: generate text with megalm's KV-cache generation from a checkpoint or an HF directory."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megalm.errors import MegalmError, run_cli
from megalm.inference.generate import Sampling, generate
from megalm.inference.load import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split(": ", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="megalm RUN_DIR, RUN_DIR/checkpoints or .../global_stepN")
    src.add_argument("--hf", help="Hugging Face model directory (llama, gpt2, qwen2, qwen3, mistral)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling options)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (auto: the GPU if there is one)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.max_new_tokens < 0:
        raise MegalmError("--max-new-tokens must not be negative")
    sampling = Sampling(greedy=a.greedy, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    sampling.check()
    torch.manual_seed(a.seed)
    model, codec = load_model(a.checkpoint, a.hf, a.device)
    prompts = [codec.encode(p) for p in a.prompt]
    room = model.cfg.max_seq_len - max(map(len, prompts))
    if room <= 0:
        raise MegalmError(f"a prompt of {max(map(len, prompts))} tokens fills the model's context ({model.cfg.max_seq_len})")
    if a.max_new_tokens > room:
        print(f"note: generating {room} tokens, the room left in the model's context of {model.cfg.max_seq_len}",
              file=sys.stderr)
    result = generate(model, prompts, min(a.max_new_tokens, room), sampling, eod=codec.eod, pad=codec.pad)
    for text, ids, new in zip(a.prompt, prompts, result.tokens, strict=True):
        stopped = codec.eod is not None and new[-1:] == [codec.eod]
        body = new[:-1] if stopped else new
        if a.json:
            print(json.dumps({"prompt": text, "prompt_tokens": ids, "tokens": new, "completion": codec.completion(ids, body),
                              "stopped_at_eod": stopped}, ensure_ascii=False))
        else:
            print(f"{text}{codec.completion(ids, body)}" + ("  [end of document]" if stopped else ""))
            print("-" * 40)
    total = sum(map(len, result.tokens))
    print(f"{total} tokens in {result.seconds:.2f} s: {result.tokens_per_second:,.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
