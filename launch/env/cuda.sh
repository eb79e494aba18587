# shellcheck shell=bash
# NCCL / PyTorch environment for NVIDIA GPU nodes. Sourced by launch/torchrun.sh when an NVIDIA driver is found or
# ZAYA_ENV=cuda. Every variable is `: "${VAR:=default}"; export VAR`, so a value exported by the caller wins.
# NCCL's own topology detection is good on NVIDIA systems (NVLink, InfiniBand/RoCE HCAs): this file only sets what
# the launch needs to fail loudly and start on the right interface; tune NCCL_IB_HCA etc. per cluster.

# shellcheck source=launch/env/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Communication streams at high priority, so gradient reduce-scatter/all-reduce is not starved by compute kernels.
: "${TORCH_NCCL_HIGH_PRIORITY:=1}"; export TORCH_NCCL_HIGH_PRIORITY
