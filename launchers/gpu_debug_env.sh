# Sourced by every launch script: on a GPU node, NCCL's flight recorder, so a hang explains itself.
#   TORCH_NCCL_TRACE_BUFFER_SIZE   the last N collectives each rank issued, kept in memory
#   TORCH_NCCL_DUMP_ON_TIMEOUT     when NCCL's watchdog times a collective out, every rank writes them
#   TORCH_NCCL_DEBUG_INFO_TEMP_FILE  to ${NCCL_TRACE_DIR:-./nccl_trace}/rank_<R> (read them with
#                                  `python -m torch.distributed.flight_recorder.fr_trace DIR`)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  a timed-out collective aborts the process instead of hanging
# Already-set values win. megalm's own timeout (parallel.collective_timeout_minutes) and stack dumps
# (RUN_DIR/stacks/) work on every backend; these add NCCL's view of the collectives on GPUs.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NCCL_TRACE_DIR=${NCCL_TRACE_DIR:-$PWD/nccl_trace}
  mkdir -p "$NCCL_TRACE_DIR"
  export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$NCCL_TRACE_DIR/rank_}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
fi
MEGALM_GPU_DEBUG_VARS="TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_NCCL_DEBUG_INFO_TEMP_FILE TORCH_NCCL_ASYNC_ERROR_HANDLING"
