"""Performance: plan a run before launching it (plan.py: memory per rank, FLOPs, step time) and
measure it (benchmark.py: tokens/s, MFU, memory, data waiting, against transformers)."""
