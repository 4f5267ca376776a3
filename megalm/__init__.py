"""megalm: pretrain GPT/Llama-style language models with tensor, pipeline and ZeRO data parallelism.

Importing megalm has no side effects: no process group, no GPU probe, no DeepSpeed import.
"""

__version__ = "0.1.0"
