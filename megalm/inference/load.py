"""Load a model for megalm's own inference: a megalm GPT at tensor size 1 in one process, from a
megalm checkpoint (any layout; fp32 masters preferred) or a Hugging Face Llama/GPT-2 directory,
with a tokenizer that encodes prompts and decodes outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalm.config import ModelConfig
from megalm.errors import MegalmError


@dataclass
class TextCodec:
    """encode/decode plus the end-of-document and padding ids, over megalm's or HF's tokenizer."""

    tokenizer: Any
    eod: int | None
    pad: int
    hf: bool = False

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if self.hf else self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def build_gpt(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Any:
    """A single-process GPT (eval mode) holding `state` (vocabulary rows padded as the model needs)."""
    from megalm.convert.hf_names import _pad_rows
    from megalm.convert.reader import VOCAB_PARAMS
    from megalm.model.gpt import GPT

    model = GPT(cfg, None).eval()
    padded = {k: _pad_rows(v.float(), model.padded_vocab_size) if k in VOCAB_PARAMS else v.float() for k, v in state.items()}
    model.load_state_dict(padded, strict=True)
    return model.to(dtype)


def load_from_checkpoint(path: str | Path) -> tuple[Any, TextCodec]:
    from megalm.convert.reader import open_checkpoint, read_state

    ckpt = open_checkpoint(path)
    state, _ = read_state(ckpt)
    tok = ckpt.tokenizer()
    return build_gpt(ckpt.config.model, state), TextCodec(tok, tok.eod, tok.pad)


def load_from_hf(hf_dir: str | Path) -> tuple[Any, TextCodec]:
    from transformers import AutoTokenizer

    from megalm.convert.hf import load_hf_dir

    cfg, state = load_hf_dir(Path(hf_dir))
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as e:
        raise MegalmError(f"{hf_dir}: no loadable tokenizer ({str(e).splitlines()[0]})") from None
    eod = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eod or 0)
    return build_gpt(cfg, state), TextCodec(tok, eod, pad, hf=True)


def load_model(checkpoint: str | None, hf_dir: str | None) -> tuple[Any, TextCodec]:
    """Exactly one of a megalm checkpoint or an HF directory."""
    if (checkpoint is None) == (hf_dir is None):
        raise MegalmError("give exactly one of --checkpoint and --hf")
    if hf_dir is not None and not Path(hf_dir).is_dir():
        raise MegalmError(f"Hugging Face directory {hf_dir} does not exist")
    return load_from_checkpoint(checkpoint) if checkpoint else load_from_hf(hf_dir)
