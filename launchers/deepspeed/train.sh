#!/usr/bin/env bash
# Launch megalm.train with DeepSpeed's launcher, on one node or on several through a hostfile.
#
#   CONFIG=configs/llama-1b.yaml NUM_GPUS=8 bash launchers/deepspeed/train.sh [section.key=value ...]
#   NUM_NODES=2 HOSTFILE=launchers/deepspeed/hostfile bash launchers/deepspeed/train.sh
#
# Variables (defaults):
#   CONFIG          configs/tiny.yaml       the run config
#   NUM_NODES       1                       nodes; > 1 needs HOSTFILE (see hostfile.example) and ssh/pdsh
#   NUM_GPUS        8 (CPU machines: 2)     processes per node (--num_gpus; on CPU, ranks)
#   HOSTFILE        launchers/deepspeed/hostfile
#   MASTER_ADDR     first host of HOSTFILE (multi-node) / 127.0.0.1
#   MASTER_PORT     29500
#   OMP_NUM_THREADS 1                       the deepspeed launcher does not set it (2-3x slower on CPU)
# Extra arguments are passed to megalm.train (config overrides).
set -euo pipefail
cd "$(dirname "$0")/../.."
source launchers/gpu_debug_env.sh  # NCCL flight recorder on GPU nodes

CONFIG=${CONFIG:-configs/tiny.yaml}
NUM_NODES=${NUM_NODES:-1}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
HOSTFILE=${HOSTFILE:-launchers/deepspeed/hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(--num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
if [ "$NUM_NODES" -gt 1 ]; then
  [ -f "$HOSTFILE" ] || { echo "error: NUM_NODES=$NUM_NODES needs a hostfile at $HOSTFILE" >&2; exit 2; }
  MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
  args+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --master_addr "$MASTER_ADDR")
else
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  args+=(--master_addr "$MASTER_ADDR")
  case "$MASTER_ADDR" in 127.*|localhost) export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} ;; esac
fi
python -m megalm.cli.preflight --config "$CONFIG" --world-size $((NUM_NODES * NUM_GPUS)) "$@"
exec deepspeed "${args[@]}" --module megalm.train --config "$CONFIG" "$@"
