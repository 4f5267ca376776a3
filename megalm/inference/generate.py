"""Autoregressive generation with megalm's GPT and its KV cache: greedy, temperature, top-k, top-p.

A batch of prompts of different lengths is laid out left-aligned (right padding) in one
(batch, total) tensor, as Meta's reference Llama generate does: the prefix every prompt has is
run in one forward pass, then one position at a time for all rows; a row whose prompt is longer
than the current position is fed its own prompt token instead of a sampled one. Every row thus sees
exactly its own tokens at their true positions: no attention mask or position shift is needed,
and the result equals generating each prompt alone. A row stops at end-of-document (it is kept
in the output, then nothing more); the batch stops when every row has stopped.

Sampling is seeded by a torch.Generator, so the same seed gives the same text on every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megalm.errors import MegalmError


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """greedy: argmax; else softmax(logits / temperature) restricted to the top_k most likely tokens
    (0: all) and to the smallest set whose probability reaches top_p (1.0: all)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise MegalmError(f"--temperature must be > 0 (use --greedy for argmax), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise MegalmError(f"--top-k must be >= 0 and --top-p in (0, 1], got {self.top_k}, {self.top_p}")


@dataclass
class Generation:
    """New tokens per prompt (ending with EOD when it stopped there) and the throughput."""

    tokens: list[list[int]]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(map(len, self.tokens)) / max(self.seconds, 1e-9)


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (batch, vocab) fp32 -> token ids (batch,)."""
    if s.greedy:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= s.top_p, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, *,
    eod: int | None, pad: int = 0,
) -> Generation:
    """Generate up to max_new_tokens after each prompt with `model` (a megalm GPT, eval mode)."""
    sampling.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MegalmError("every prompt needs at least one token")
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise MegalmError(f"prompt ({max(lengths)} tokens) + --max-new-tokens ({max_new_tokens}) exceed the "
                          f"model's max_seq_len ({model.cfg.max_seq_len})")
    device = next(model.parameters()).device
    tokens = torch.full((len(prompts), total), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    is_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = model.new_cache(len(prompts), total)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    start, prev = time.perf_counter(), 0
    for pos in range(min(lengths), total):
        logits = model.logits_full(tokens[:, prev:pos], start_pos=prev, cache=cache)[:, -1].float()
        chosen = next_token(logits, sampling, generator)
        chosen = torch.where(is_prompt[:, pos], tokens[:, pos], torch.where(done, pad, chosen))
        tokens[:, pos] = chosen
        if eod is not None:
            done |= ~is_prompt[:, pos] & (chosen == eod)
        prev = pos
        if done.all():
            break
    seconds = time.perf_counter() - start
    return Generation([_new_tokens(tokens[i], n, max_new_tokens, eod) for i, n in enumerate(lengths)], seconds)


def _new_tokens(row: torch.Tensor, prompt_len: int, max_new: int, eod: int | None) -> list[int]:
    out = row[prompt_len : prompt_len + max_new].tolist()
    if eod is not None and eod in out:
        out = out[: out.index(eod) + 1]
    return out
