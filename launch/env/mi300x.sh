# shellcheck shell=bash
# RCCL / HSA / PyTorch environment for AMD Instinct MI300X nodes (8 GPUs on Infinity Fabric, one RDMA NIC per GPU
# on a rails-only RoCE fabric, as in the ZAYA1 cluster). Sourced by launch/torchrun.sh when ROCm is found or
# ZAYA_ENV=mi300x. Every variable is `: "${VAR:=default}"; export VAR`, so a value exported by the caller wins:
#   NCCL_DEBUG=INFO NCCL_IB_HCA=rdma0,rdma1 launch/torchrun.sh 8 recipe=pretrain ...
# Sources: AMD's Primus launcher (base_env.sh, MI300X.sh), ROCm/Megatron-LM and AMD-AGI/axlearn launch scripts,
# the RCCL usage tips; see research/anchors-training.md section 7.1. Measure before changing a value.

# shellcheck source=launch/env/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# --- RCCL over the RoCE fabric -------------------------------------------------------------------------------
_zaya_hcas="$(zaya_active_hcas)"
if [[ -n "$_zaya_hcas" ]]; then
    # Only RDMA devices that are up; if the storage/front-end NIC is RDMA-capable too, export the GPU NICs yourself.
    : "${NCCL_IB_HCA:=$_zaya_hcas}"; export NCCL_IB_HCA
fi
unset _zaya_hcas
# RoCE v2 over IPv4 sits at GID index 3 on these NICs (Primus and ROCm/Megatron-LM both pin it).
: "${NCCL_IB_GID_INDEX:=3}"; export NCCL_IB_GID_INDEX
# Rails-only topology: GPU i talks to GPU i of the other nodes through NIC i; crossing rails costs a spine hop.
: "${NCCL_CROSS_NIC:=0}"; export NCCL_CROSS_NIC
# The Simple protocol everywhere: the setting AMD's Megatron MoE and axlearn multi-node scripts train with.
: "${NCCL_PROTO:=Simple}"; export NCCL_PROTO
# Skip RCCL's per-call argument checks: a small saving on every collective (Primus, ROCm/Megatron-LM).
: "${NCCL_CHECKS_DISABLE:=1}"; export NCCL_CHECKS_DISABLE
# PXN (send through a peer GPU's NIC) can speed all-to-all but costs GPU memory; we run no expert parallelism.
: "${NCCL_PXN_DISABLE:=1}"; export NCCL_PXN_DISABLE
# Larger network chunks for point-to-point transfers, the value Primus pairs with PXN off.
: "${NCCL_P2P_NET_CHUNKSIZE:=524288}"; export NCCL_P2P_NET_CHUNKSIZE
# MSCCL is on by default on MI300X in older RCCL; AMD's training scripts turn it off "for better stability"
# (newer RCCL removed MSCCL, where this is a no-op).
: "${RCCL_MSCCL_ENABLE:=0}"; export RCCL_MSCCL_ENABLE
# MSCCL++ likewise off: Primus's MI300X file notes training "works well with MSCCLPP disabled".
: "${RCCL_MSCCLPP_ENABLE:=0}"; export RCCL_MSCCLPP_ENABLE
# Not set: NCCL_MIN_NCHANNELS (more channels can help intra-node all-reduce bandwidth; measure with rccl-tests and
# export it yourself), CUDA_DEVICE_MAX_CONNECTIONS=1 (only Megatron-style tensor-parallel overlap needs it).

# --- PyTorch process groups ------------------------------------------------------------------------------------
# Communication streams at high priority, so gradient reduce-scatter/all-reduce is not starved by compute kernels.
: "${TORCH_NCCL_HIGH_PRIORITY:=1}"; export TORCH_NCCL_HIGH_PRIORITY
# No allocator hook registering every tensor with RCCL: Primus turns it off on MI300X with expandable segments.
: "${TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK:=0}"; export TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK

# --- HIP / HSA runtime -----------------------------------------------------------------------------------------
# RCCL needs fine-grained (coherent) host/PCIe memory for GPU peer-to-peer and GPU-direct RDMA buffers.
: "${HSA_FORCE_FINE_GRAIN_PCIE:=1}"; export HSA_FORCE_FINE_GRAIN_PCIE
# Kernel arguments in device memory: lower launch latency for the many small MoE/router kernels (axlearn sets it).
: "${HIP_FORCE_DEV_KERNARG:=1}"; export HIP_FORCE_DEV_KERNARG
# Two hardware queues per GPU instead of the runtime's default: the value both AMD training launchers use.
: "${GPU_MAX_HW_QUEUES:=2}"; export GPU_MAX_HW_QUEUES
# Keep scratch memory instead of reclaiming it between kernels: Primus notes reclaim "to avoid MoE training crash"
# must be disabled and ROCm/Megatron's Mixtral script sets 1 (Primus's own default is 0: check on your ROCm).
: "${HSA_NO_SCRATCH_RECLAIM:=1}"; export HSA_NO_SCRATCH_RECLAIM
# No XNACK (GPU page-fault retry): training memory is all device memory, so nothing needs migrating on a fault.
: "${HSA_XNACK:=0}"; export HSA_XNACK
# The share (percent) of HBM one heap may take: all of it, so the caching allocator can reach the 192 GB.
: "${GPU_MAX_HEAP_SIZE:=100}"; export GPU_MAX_HEAP_SIZE
# A 12 MiB kernel-argument pool (Primus MI300X.sh): many small kernels in flight do not stall on a full pool.
: "${HSA_KERNARG_POOL_SIZE:=12582912}"; export HSA_KERNARG_POOL_SIZE
