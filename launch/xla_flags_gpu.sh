#!/usr/bin/env bash
# XLA flags for multi-GPU training: overlap collectives with compute and send fewer,
# larger NCCL messages. Source it before starting JAX (slurm.sbatch does):
#   source launch/xla_flags_gpu.sh
# or, from another shell:  eval "$(bash launch/xla_flags_gpu.sh)"
# Flags already in XLA_FLAGS come after these, so they win.

_amos_xla_usage() {
  cat <<'EOF'
usage: source launch/xla_flags_gpu.sh        (exports XLA_FLAGS)
       eval "$(bash launch/xla_flags_gpu.sh)"
       bash launch/xla_flags_gpu.sh --help

Exports XLA_FLAGS with the latency-hiding scheduler and collective-combining flags
for GPU runs; flags already in XLA_FLAGS are kept after them and take precedence.
Environment:
  AMOS_XLA_COMBINE_BYTES  combine threshold for all-reduce, all-gather and
                          reduce-scatter, in bytes (default 134217728 = 128 MiB)
EOF
}

_amos_xla_flags() {
  local combine="${AMOS_XLA_COMBINE_BYTES:-134217728}"
  local flags=(
    # Schedule asynchronous collectives early and their waits late, so NCCL
    # transfers run while independent matmuls compute.
    --xla_gpu_enable_latency_hiding_scheduler=true
    # Give the collective stream the highest priority: overlapped compute kernels
    # must not starve the transfers the next layer waits on.
    --xla_gpu_enable_highest_priority_async_stream=true
    # One all-reduce per gradient leaf is hundreds of small NCCL calls, each paying
    # launch latency; combining them up to this size makes a few large ones.
    --xla_gpu_all_reduce_combine_threshold_bytes="${combine}"
    # The same for FSDP's per-parameter all-gathers (forward) ...
    --xla_gpu_all_gather_combine_threshold_bytes="${combine}"
    # ... and its gradient reduce-scatters (backward).
    --xla_gpu_reduce_scatter_combine_threshold_bytes="${combine}"
    # Combine gathers and scatters of parameters with different shapes too; by
    # default only those along the same dimension are merged.
    --xla_gpu_enable_all_gather_combine_by_dim=false
    --xla_gpu_enable_reduce_scatter_combine_by_dim=false
    # In a scanned layer stack, start layer i+1's parameter gather and layer i's
    # gradient reduce-scatter/all-reduce in the neighbouring iteration, so they
    # overlap that iteration's compute.
    --xla_gpu_enable_pipelined_all_gather=true
    --xla_gpu_enable_pipelined_reduce_scatter=true
    --xla_gpu_enable_pipelined_all_reduce=true
    # Unroll loops by two with double-buffered carries: the pipelined collectives
    # above then have an iteration's compute to hide behind.
    --xla_gpu_enable_while_loop_double_buffering=true
  )
  printf '%s' "${flags[*]}${XLA_FLAGS:+ ${XLA_FLAGS}}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # Executed: print an export line (or the usage) instead of changing this shell.
  case "${1:-}" in
    -h|--help) _amos_xla_usage; exit 0 ;;
    "") printf 'export XLA_FLAGS=%q\n' "$(_amos_xla_flags)"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
fi

# Sourced: the caller's own arguments are not ours to read.
XLA_FLAGS="$(_amos_xla_flags)"
export XLA_FLAGS
unset -f _amos_xla_usage _amos_xla_flags
