"""Train a tokenizer from the same inputs preprocess reads: sentencepiece BPE/unigram or byte-level BPE.

sentencepiece is trained as Llama's was: byte fallback (no text is ever unknown), split digits, no
normalization and whitespace kept as is (tabs and newlines survive a round trip; a newline, never
seen inside a training line, encodes as its byte piece). Character
coverage defaults to 0.9995: the rarest 0.05% of characters are left to byte fallback. For corpora
heavy in Chinese/Japanese at a small vocabulary this still demands thousands of single-character
pieces (sentencepiece refuses a vocab smaller than the required characters): use
`--character-coverage 0.995` with a vocabulary of 4000+, or lower coverage and rely on byte fallback.
Lines over 4192 bytes are skipped by sentencepiece; documents are therefore fed line by line.

Outputs: PREFIX.model (sentencepiece) or PREFIX.json (a Hugging Face tokenizer.json), and
PREFIX.info.json describing it (type, vocab size, special ids, fingerprint).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from megalm.data.sources import iter_chunks, record_text, resolve_inputs
from megalm.data.tokenizer import HF_EOD, Tokenizer, build_tokenizer
from megalm.errors import MegalmError


def iter_texts(inputs: list[str], json_key: str) -> Iterator[str]:
    """Every non-empty document's text; bad records are skipped (a tokenizer does not need them all)."""
    for chunk in iter_chunks(resolve_inputs(inputs), json_key):
        for item in chunk.items:
            text, why = record_text(chunk, item)
            if why is None and text.strip():
                yield text


def _lines(texts: Iterator[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterator[str], model_type: str, vocab_size: int, prefix: str, coverage: float, special: list[str]
) -> Tokenizer:
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_prefix=prefix, model_type=model_type, vocab_size=vocab_size,
            character_coverage=coverage, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            user_defined_symbols=special or [], input_sentence_size=5_000_000, shuffle_input_sentence=True,
            num_threads=min(4, os.cpu_count() or 1), minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "failed"
        msg = msg.split("] ", 1)[-1]  # drop sentencepiece's source location and assertion text
        hint = " (byte fallback adds 256 byte pieces to the required ones)" if "required_chars" in msg else ""
        raise MegalmError(f"sentencepiece training failed: {msg}{hint}") from None
    return build_tokenizer("sentencepiece", prefix + ".model")


def train_bytelevel(texts: Iterator[str], vocab_size: int, prefix: str, special: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE: every byte is in the alphabet, `<|endoftext|>` is id 0."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[HF_EOD, *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(prefix + ".json")
    return build_tokenizer("hf", prefix + ".json")


def train_tokenizer(
    inputs: list[str], kind: str, vocab_size: int, output_prefix: str, *, json_key: str = "text",
    character_coverage: float = 0.9995, special_tokens: list[str] | None = None,
) -> dict[str, Any]:
    """Train, write PREFIX.model|.json and PREFIX.info.json; return the info dict."""
    if not Path(output_prefix).parent.is_dir():
        raise MegalmError(f"output folder '{Path(output_prefix).parent}' does not exist")
    if vocab_size < 1 or not 0 < character_coverage <= 1:
        raise MegalmError("--vocab-size must be positive and --character-coverage in (0, 1]")
    resolve_inputs(inputs)  # fail on bad paths before training starts
    texts = iter_texts(inputs, json_key)
    special = list(special_tokens or [])
    if kind in ("bpe", "unigram"):
        tok = train_sentencepiece(texts, kind, vocab_size, output_prefix, character_coverage, special)
    elif kind == "bytelevel":
        tok = train_bytelevel(texts, vocab_size, output_prefix, special)
    else:
        raise MegalmError(f"unknown tokenizer kind '{kind}'; use bpe, unigram or bytelevel")
    info = {**tok.describe(), "model_type": kind, "files": [os.path.basename(f) for f in tok.files()]}
    info["special_tokens"] = special
    Path(output_prefix + ".info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
