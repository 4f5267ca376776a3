#!/usr/bin/env bash
# Launch megalm.train with mpirun/mpiexec (OpenMPI). megalm reads its rank from OMPI_COMM_WORLD_*;
# the rendezvous address is given explicitly (DeepSpeed's MPI discovery, which picks a
# non-loopback address, is never used).
#
#   NP=16 HOSTFILE=hosts MASTER_ADDR=node01 NET_IF=ib0 bash launchers/mpi/train.sh
#
# Variables (defaults):
#   CONFIG       configs/tiny.yaml
#   NP           2                    total processes
#   HOSTFILE     (none: this node)    OpenMPI hostfile ("node01 slots=8")
#   MASTER_ADDR  127.0.0.1            host of rank 0, reachable from every node
#   MASTER_PORT  29590
#   NET_IF       lo                   interface for MPI's TCP traffic and gloo (eth0, ib0, ... on clusters)
#   MPIRUN       mpirun
# Extra arguments are passed to megalm.train.
set -euo pipefail
cd "$(dirname "$0")/../.."
source launchers/gpu_debug_env.sh  # NCCL flight recorder on GPU nodes

CONFIG=${CONFIG:-configs/tiny.yaml}
NP=${NP:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29590}
NET_IF=${NET_IF:-lo}
MPIRUN=${MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IF}

opts=(-np "$NP" --mca oob_tcp_if_include "$NET_IF" --mca btl_tcp_if_include "$NET_IF"
      -x OMP_NUM_THREADS -x MASTER_ADDR -x MASTER_PORT -x GLOO_SOCKET_IFNAME -x PATH -x PYTHONPATH)
for v in $MEGALM_GPU_DEBUG_VARS; do if [ -n "${!v:-}" ]; then opts+=(-x "$v"); fi; done
[ -n "${HOSTFILE:-}" ] && opts+=(--hostfile "$HOSTFILE")
[ "$(id -u)" -eq 0 ] && opts+=(--allow-run-as-root)
[ "$NP" -gt "$(nproc)" ] && [ -z "${HOSTFILE:-}" ] && opts+=(--oversubscribe)
[ -z "${HOSTFILE:-}" ] && opts+=(--mca btl self,vader,tcp)

python -m megalm.cli.preflight --config "$CONFIG" --world-size "$NP" "$@"
exec "$MPIRUN" "${opts[@]}" python -m megalm.train --config "$CONFIG" "$@"
