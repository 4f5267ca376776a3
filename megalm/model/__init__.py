"""The decoder-only transformer (Llama and GPT-2 families), tensor-parallel ready."""

from megalm.model.gpt import (
    GPT,
    Block,
    Embedding,
    FinalNorm,
    GPTLoss,
    Head,
    padded_vocab,
    resolve_model_config,
)
from megalm.model.layers import KVCache
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

__all__ = [
    "GPT", "Block", "Embedding", "FinalNorm", "GPTLoss", "Head", "KVCache",
    "padded_vocab", "resolve_model_config", "vocab_parallel_cross_entropy",
]
