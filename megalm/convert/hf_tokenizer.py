"""megalm tokenizers <-> Hugging Face tokenizer directories, with megalm's EOD as the eos token.

- byte: a `tokenizers` tokenizer.json whose byte-level pre-tokenizer maps each UTF-8 byte b to one
  character and whose BPE model (no merges) maps that character to id b, so ids 0..255 are exactly
  the bytes and 256 is `<|endoftext|>` (EOD). `split_special_tokens` is set so that the text
  "<|endoftext|>" encodes as its bytes, as megalm's ByteTokenizer does.
- sentencepiece: converted with transformers' SpmConverter (unigram or BPE, byte fallback, the
  model's normalizer; megalm.seams.spm_tokenizer_json) into tokenizer.json; the .model is copied
  beside it. No BOS is added:
  megalm trains on documents without BOS.
- hf (byte-level BPE tokenizer.json): copied as is, wrapped as PreTrainedTokenizerFast.

`tokenizer_from_hf_dir` goes the other way for from-hf: a megalm tokenizer file from an HF dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from megalm import seams
from megalm.data.tokenizer import HF_EOD, HF_EOD_TOKENS, Tokenizer
from megalm.errors import MegalmError

MEGALM_SIDECAR = "megalm.json"


def byte_tokenizer_json() -> str:
    """tokenizer.json of megalm's byte tokenizer: bytes 0..255 -> ids 0..255, EOD -> 256."""
    alphabet = ByteLevel.alphabet()  # the 256 characters GPT-2's byte-to-unicode table uses
    table = _bytes_to_unicode()
    assert sorted(table.values()) == sorted(alphabet)
    vocab = {table[b]: b for b in range(256)}
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(HF_EOD, special=True, normalized=False)])
    assert tok.token_to_id(HF_EOD) == 256
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as in the tokenizers library)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write `tokenizer` into out_dir so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - heavy

    out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if tokenizer.type == "byte":
        raw = byte_tokenizer_json()
        extra = {"split_special_tokens": True}
    elif tokenizer.type == "sentencepiece":
        raw = seams.spm_tokenizer_json(tokenizer.model_file)
        shutil.copy2(tokenizer.model_file, out_dir / "tokenizer.model")
    elif tokenizer.type == "hf":
        raw = Path(tokenizer.json_file).read_text(encoding="utf-8")
    else:
        raise MegalmError(f"cannot export a tokenizer of type {tokenizer.type}")
    raw_tok = RawTokenizer.from_str(raw)
    eos = raw_tok.id_to_token(tokenizer.eod)
    bos = raw_tok.id_to_token(tokenizer.bos) if tokenizer.bos is not None else None
    pad = raw_tok.id_to_token(tokenizer.pad)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw_tok, eos_token=eos, bos_token=bos, pad_token=pad,
                                 clean_up_tokenization_spaces=False, **extra)
    hf.save_pretrained(str(out_dir))
    sidecar = {"tokenizer": tokenizer.describe()}
    (out_dir / MEGALM_SIDECAR).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")


def tokenizer_from_hf_dir(hf_dir: Path, out_dir: Path) -> tuple[str, str]:
    """(tokenizer_type, tokenizer_model) for a megalm config, copying the file into out_dir.

    A directory written by to-hf says its type in megalm.json; otherwise tokenizer.model means
    sentencepiece and tokenizer.json with an end-of-text token (HF_EOD_TOKENS: Llama 3's, Qwen's,
    Mistral's) a byte-level BPE ("hf")."""
    sidecar = hf_dir / MEGALM_SIDECAR
    kind = json.loads(sidecar.read_text())["tokenizer"]["type"] if sidecar.is_file() else None
    if kind == "byte":
        return "byte", ""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind in (None, "sentencepiece") and (hf_dir / "tokenizer.model").is_file():
        shutil.copy2(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
        return "sentencepiece", str(out_dir / "tokenizer.model")
    if (hf_dir / "tokenizer.json").is_file():
        text = (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
        if not any(token in text for token in HF_EOD_TOKENS):
            raise MegalmError(f"{hf_dir}/tokenizer.json has none of {', '.join(HF_EOD_TOKENS)}, which megalm's hf "
                              "tokenizer ends documents with; pass --no-tokenizer and set data.tokenizer_* yourself")
        shutil.copy2(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
        return "hf", str(out_dir / "tokenizer.json")
    raise MegalmError(f"{hf_dir}: no tokenizer.model or tokenizer.json; pass --no-tokenizer and set "
                      "data.tokenizer_type/data.tokenizer_model yourself")
