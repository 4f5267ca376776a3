#!/usr/bin/env bash
# The main job end to end on a built-in default (see megalm/cli/quickstart.py):
#   corpus (Python's bundled docs) -> sentencepiece BPE -> shards (2 workers) -> tiny Llama trained
#   by 2 processes with tensor parallelism -> TensorBoard + loss_curve.png -> Hugging Face export ->
#   text from transformers' generate() and the validation perplexity.
# Your own corpus: bash tools/quickstart.sh --corpus my.jsonl --out runs/mine
# Finished stages are reused on a second run; --fresh starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec python -m megalm.cli.quickstart "$@"
