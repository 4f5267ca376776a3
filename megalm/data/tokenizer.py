"""One `Tokenizer` interface over sentencepiece, Hugging Face byte-level BPE and raw bytes.

`fingerprint()` identifies what a tokenizer *does* (its pieces, scores and special ids), not its file
bytes: sentencepiece embeds the training input path in the .model, so two identical tokenizers can
differ byte-wise. Shards record the fingerprint in PREFIX.meta.json and the trainer checks it
(`megalm.data.meta.check_shard_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTok

from megalm.errors import MegalmError

HF_EOD = "<|endoftext|>"
HF_EOD_TOKENS = (HF_EOD, "<|end_of_text|>", "</s>")
"""End-of-document tokens of tokenizer.json files, the first one the file has wins: GPT-2's and
Qwen's <|endoftext|>, Llama 3's <|end_of_text|>, Mistral's and Llama 2's </s>."""


class Tokenizer(ABC):
    """Text <-> token ids. `eod` ends every document in the shards; `pad` defaults to `eod`."""

    type: str = ""
    vocab_size: int
    eod: int
    bos: int | None = None
    pad: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOD (the preprocessor appends EOD)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are kept where the library can render them."""

    @abstractmethod
    def _identity(self) -> object:
        """A JSON-serialisable description of the vocabulary that `fingerprint()` hashes."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def files(self) -> list[str]:
        """Files that reproduce this tokenizer (the trainer copies them into checkpoints)."""
        return []

    def fingerprint(self) -> str:
        """sha256 hex digest of type, vocabulary and special ids (computed once)."""
        cached = getattr(self, "_fingerprint", None)
        if cached:
            return cached
        payload = {"type": self.type, "vocab": self._identity(), "eod": self.eod, "bos": self.bos}
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self._fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        """The facts a shard's meta.json and a tokenizer's info.json record."""
        return {
            "type": self.type, "vocab_size": self.vocab_size, "eod": self.eod, "bos": self.bos,
            "pad": self.pad, "fingerprint": self.fingerprint(),
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, 256 ends a document; vocab 257. Needs no file."""

    type = "byte"
    vocab_size = 257
    eod = 256
    pad = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def _identity(self) -> object:
        return "utf-8 bytes + eod"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model (BPE or unigram, byte fallback or not); EOD is the model's eos id."""

    type = "sentencepiece"

    def __init__(self, model_file: str) -> None:
        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as e:
            raise MegalmError(f"{model_file}: not a readable sentencepiece model ({_first_line(e)})") from None
        self.vocab_size = self.sp.vocab_size()
        if self.sp.eos_id() < 0:
            raise MegalmError(f"{model_file}: the sentencepiece model has no eos piece to end documents with")
        self.eod = self.sp.eos_id()
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)  # one core per worker process; workers scale out

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def files(self) -> list[str]:
        return [self.model_file]

    def _identity(self) -> object:
        sp = self.sp
        kinds = [
            "c" if sp.is_control(i) else "u" if sp.is_unknown(i) else "b" if sp.is_byte(i) else "n"
            for i in range(self.vocab_size)
        ]
        pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        scores = [round(float(sp.get_score(i)), 6) for i in range(self.vocab_size)]
        return {"pieces": pieces, "scores": scores, "kinds": "".join(kinds), "unk": sp.unk_id()}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (GPT-2 style byte-level BPE); EOD is `<|endoftext|>`."""

    type = "hf"

    def __init__(self, json_file: str) -> None:
        self.json_file = str(json_file)
        try:
            self.tok = HFTok.from_file(self.json_file)
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise MegalmError(f"{json_file}: not a readable tokenizer.json ({_first_line(e)})") from None
        eod = next((i for i in map(self.tok.token_to_id, HF_EOD_TOKENS) if i is not None), None)
        if eod is None:
            raise MegalmError(f"{json_file}: the tokenizer has none of {', '.join(HF_EOD_TOKENS)} to end documents with")
        self.eod = eod
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.pad = self.eod

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def files(self) -> list[str]:
        return [self.json_file]

    def _identity(self) -> object:
        spec = json.loads(self.tok.to_str())
        return {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = "") -> Tokenizer:
    """`byte` (no file), `sentencepiece` (a .model) or `hf` (a tokenizer.json); bad paths are MegalmErrors."""
    if tokenizer_type == "byte":
        return ByteTokenizer()
    if tokenizer_type not in ("sentencepiece", "hf"):
        raise MegalmError(f"unknown tokenizer type '{tokenizer_type}'; use byte, sentencepiece or hf")
    path = Path(tokenizer_model)
    if not tokenizer_model or not path.is_file():
        raise MegalmError(f"tokenizer model '{tokenizer_model}' not found (needed by tokenizer type {tokenizer_type})")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise MegalmError(f"tokenizer model '{tokenizer_model}' is not readable: {e.strerror}") from None
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(str(path))
    return HFTokenizer(str(path))
