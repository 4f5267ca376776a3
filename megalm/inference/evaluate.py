"""Loss and perplexity of a model on token data, and BLEU/ROUGE of its generations.

Loss: the token stream (documents concatenated, each ending with EOD) is cut into consecutive,
non-overlapping windows of seq_len + 1 tokens (inputs [:-1], targets [1:]); the loss is the mean
next-token cross entropy over every target token, perplexity = exp(loss).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megalm.data.indexed import IndexedDataset
from megalm.errors import MegalmError


def tokens_from_prefix(prefix: str, max_tokens: int) -> np.ndarray:
    """The first max_tokens tokens of a PREFIX.bin/.idx shard (Megatron layout), in document order."""
    ds = IndexedDataset(prefix)  # a missing or broken shard is a MegalmError naming it
    return np.asarray(ds.tokens[:max_tokens], dtype=np.int64)


def tokens_from_text(path: str, codec: Any, max_tokens: int) -> np.ndarray:
    """A text file, documents separated by blank lines (as preprocess_data's .txt), each + EOD."""
    p = Path(path)
    if not p.is_file():
        raise MegalmError(f"--text-file {path} not found")
    ids: list[int] = []
    for doc in p.read_text(encoding="utf-8").split("\n\n"):
        if doc.strip():
            ids.extend(codec.encode(doc.strip()))
            if codec.eod is not None:
                ids.append(codec.eod)
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


@torch.no_grad()
def loss_and_perplexity(model: Any, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """Mean token loss over consecutive seq_len + 1 windows of `tokens`, and its perplexity."""
    windows = len(tokens) // (seq_len + 1)
    if windows == 0:
        raise MegalmError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    data = torch.from_numpy(tokens[: windows * (seq_len + 1)]).view(windows, seq_len + 1)
    total, count = 0.0, 0
    for i in range(0, windows, batch_size):
        batch = data[i : i + batch_size]
        logits = model.logits_full(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count, "windows": windows}


def read_references(path: str) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from a JSONL file with "prompt" and "reference" keys."""
    p = Path(path)
    if not p.is_file():
        raise MegalmError(f"--references {path} not found")
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["prompt"]), str(row["reference"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MegalmError(f"{path}:{n}: expected a JSON object with 'prompt' and 'reference'") from None
    if not pairs:
        raise MegalmError(f"{path}: no prompt/reference pairs")
    return pairs


def bleu_rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score); a metric whose package is not
    installed is left out (pip install 'megalm[dev]')."""
    out: dict[str, float] = {}
    try:
        import sacrebleu  # noqa: PLC0415 - optional (megalm[dev])

        out["bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
    except ImportError:
        pass
    try:
        from rouge_score import rouge_scorer  # noqa: PLC0415 - optional (megalm[dev])

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
        scores = [scorer.score(r, h) for h, r in zip(hypotheses, references, strict=True)]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = sum(s[key].fmeasure for s in scores) / len(scores)
    except ImportError:
        pass
    return out
