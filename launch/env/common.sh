# shellcheck shell=bash
# Settings shared by launch/env/mi300x.sh and launch/env/cuda.sh; sourced by them, never on its own.
# Every variable keeps a value the caller already exported: `NCCL_DEBUG=INFO launch/torchrun.sh 8 ...`.
# Expects NPROC_PER_NODE (a number, or torchrun's `gpu`) from launch/torchrun.sh.

# The IPv4 interface of the default route: where the rendezvous and NCCL/RCCL bootstrap traffic goes unless the
# caller names one. Prints nothing when `ip` is missing or there is no default route.
zaya_default_iface() {
    command -v ip >/dev/null 2>&1 || return 0
    ip -o -4 route show to default 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }'
}

# RDMA devices whose port 1 is ACTIVE, comma-separated (e.g. `rdma0,rdma1,...`); nothing on a host without them.
zaya_active_hcas() {
    local dev state names=()
    for dev in /sys/class/infiniband/*; do
        [[ -r "$dev/ports/1/state" ]] || continue
        state="$(<"$dev/ports/1/state")"
        [[ "$state" == *ACTIVE* ]] && names+=("${dev##*/}")
    done
    local IFS=,
    printf '%s' "${names[*]}"
}

_zaya_iface="$(zaya_default_iface)"
if [[ -n "$_zaya_iface" ]]; then
    # NCCL/RCCL bootstrap and socket fallback on the routed interface, not docker0/lo picked by name order.
    : "${NCCL_SOCKET_IFNAME:=$_zaya_iface}"; export NCCL_SOCKET_IFNAME
    # gloo (CPU collectives, DeepSpeed's object broadcasts) on the same interface, for the same reason.
    : "${GLOO_SOCKET_IFNAME:=$_zaya_iface}"; export GLOO_SOCKET_IFNAME
fi
unset _zaya_iface

# Warnings and errors with their cause (INFO prints every ring and channel: use it when debugging a hang).
: "${NCCL_DEBUG:=WARN}"; export NCCL_DEBUG
# A failed or timed-out collective aborts the communicator and the process, so torchrun and Slurm see a failure
# (and a requeued job resumes) instead of every rank hanging until the wall-clock limit.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"; export TORCH_NCCL_ASYNC_ERROR_HANDLING
# MoE activations change shape every step (tokens per expert); expandable segments stop the caching allocator from
# fragmenting into blocks of the wrong size (torchtitan's and nanochat's launchers set it too).
: "${PYTORCH_ALLOC_CONF:=expandable_segments:True}"; export PYTORCH_ALLOC_CONF
if [[ "${NPROC_PER_NODE:-}" =~ ^[0-9]+$ ]] && (( NPROC_PER_NODE > 0 )); then
    _zaya_threads=$(( $(nproc) / NPROC_PER_NODE ))
    # CPU threads per rank: the node's cores shared by its ranks (torchrun would otherwise force 1 and warn), so
    # data loading, tokenization and the optimizer's host work are not single-threaded.
    : "${OMP_NUM_THREADS:=$(( _zaya_threads > 0 ? _zaya_threads : 1 ))}"; export OMP_NUM_THREADS
    unset _zaya_threads
fi
