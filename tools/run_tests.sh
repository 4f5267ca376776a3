#!/usr/bin/env bash
# The test command (README): the whole suite, CPU only, distributed tests on gloo over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
