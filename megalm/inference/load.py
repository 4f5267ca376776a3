"""Load a model for megalm's own inference: a megalm GPT at tensor size 1 in one process, from a
megalm checkpoint (any layout; fp32 masters preferred) or a Hugging Face model directory (a family of megalm.convert.families),
with a tokenizer that encodes prompts and decodes outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalm.config import ModelConfig
from megalm.convert.hf_import import load_hf_dir
from megalm.convert.reader import open_checkpoint, read_state
from megalm.errors import MegalmError
from megalm.model.gpt import GPT, VOCAB_PARAMETERS
from megalm.parallel.context import TensorParallel
from megalm.parallel.vocab import pad_vocab_rows


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

    def completion(self, prompt: list[int], new: list[int]) -> str:
        """The text that `new` adds after `prompt`, as the whole sequence decodes it, so that
        prompt text + completion reads as decode(prompt + new). Decoding `new` alone loses what
        depends on its left context: sentencepiece drops a leading word boundary (' the' -> 'the')."""
        whole, head = self.decode(prompt + new), self.decode(prompt)
        if whole.startswith(head):
            return whole[len(head):]
        return whole[len(os.path.commonprefix([whole, head])):]  # the prompt's tail decodes differently


def build_gpt(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Any:
    """A single-process GPT (eval mode) holding `state`, GPT names at tensor size 1 with the
    tokenizer's vocabulary rows (padded here as the model needs)."""
    model = GPT(cfg, TensorParallel.build(None)).eval()
    padded = {k: pad_vocab_rows(v.float(), model.padded_vocab_size) if k in VOCAB_PARAMETERS else v.float()
              for k, v in state.items()}
    model.load_state_dict(padded, strict=True)
    return model.to(dtype)


def load_from_checkpoint(path: str | Path) -> tuple[Any, TextCodec]:
    ckpt = open_checkpoint(path)
    state, _ = read_state(ckpt)
    tok = ckpt.tokenizer()
    return build_gpt(ckpt.config.model, state), TextCodec(tok, tok.eod, tok.pad)


def load_from_hf(hf_dir: str | Path) -> tuple[Any, TextCodec]:
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy

    cfg, state = load_hf_dir(Path(hf_dir))
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as e:
        raise MegalmError(f"{hf_dir}: no loadable tokenizer ({str(e).splitlines()[0]})") from None
    eod = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eod or 0)
    return build_gpt(cfg, state), TextCodec(tok, eod, pad, hf=True)


def load_model(checkpoint: str | None, hf_dir: str | None, device: str = "cpu") -> tuple[Any, TextCodec]:
    """Exactly one of a megalm checkpoint or an HF directory, on `device` ("auto": the GPU if there
    is one, else the CPU)."""
    if (checkpoint is None) == (hf_dir is None):
        raise MegalmError("give exactly one of --checkpoint and --hf")
    if hf_dir is not None and not Path(hf_dir).is_dir():
        raise MegalmError(f"Hugging Face directory {hf_dir} does not exist")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MegalmError("--device cuda: no CUDA device is visible here (use --device cpu)")
    model, codec = load_from_checkpoint(checkpoint) if checkpoint else load_from_hf(hf_dir)
    return model.to(device), codec
