"""The decoder-only transformer (Llama and GPT-2 families), tensor-parallel ready."""

from megalm.model.gpt import (
    GPT,
    PIPELINE_LAYERS,
    VOCAB_PARAMETERS,
    Block,
    Embedding,
    FinalNorm,
    Head,
    padded_vocab,
)
from megalm.model.layers import KVCache

__all__ = [
    "GPT", "PIPELINE_LAYERS", "VOCAB_PARAMETERS", "Block", "Embedding", "FinalNorm", "Head", "KVCache", "padded_vocab",
]
