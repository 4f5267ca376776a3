#!/usr/bin/env bash
# Launch megalm.train with torchrun: one node (standalone) or several (c10d rendezvous).
#
#   NUM_GPUS=8 bash launchers/torchrun/train.sh
#   # on every node of a 2-node job:
#   NUM_NODES=2 NUM_GPUS=8 MASTER_ADDR=node01 RDZV_ID=myjob bash launchers/torchrun/train.sh
#
# Variables (defaults):
#   CONFIG      configs/tiny.yaml
#   NUM_NODES   1
#   NUM_GPUS    CUDA devices, or 2 on CPU       processes per node
#   MASTER_ADDR 127.0.0.1                        rendezvous host (multi-node: any node all can reach)
#   MASTER_PORT 29500
#   RDZV_ID     megalm                           the same string on every node of one job
# torchrun sets OMP_NUM_THREADS=1. Extra arguments are passed to megalm.train.
set -euo pipefail
cd "$(dirname "$0")/../.."
source launchers/gpu_debug_env.sh  # NCCL flight recorder on GPU nodes

CONFIG=${CONFIG:-configs/tiny.yaml}
NUM_NODES=${NUM_NODES:-1}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
case "$MASTER_ADDR" in 127.*|localhost) export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} ;; esac

python -m megalm.cli.preflight --config "$CONFIG" --world-size $((NUM_NODES * NUM_GPUS)) "$@"
if [ "$NUM_NODES" -eq 1 ]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-megalm}")
fi
exec torchrun --nnodes "$NUM_NODES" --nproc_per_node "$NUM_GPUS" "${rdzv[@]}" \
  -m megalm.train --config "$CONFIG" "$@"
