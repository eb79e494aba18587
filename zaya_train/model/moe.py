"""Top-1 SwiGLU experts with sort-based grouped dispatch, and the ZAYA1 MoE block (router + experts).

Dispatch: tokens are sorted by expert id, every expert runs on its contiguous slice through one grouped GEMM
(`torch.nn.functional.grouped_mm`, which also runs on CPU) or, where that is unavailable for the device and
dtype, one GEMM per expert (a loop over experts, never over tokens); outputs are weighted and scattered back.
Tokens routed to the skip class produce zero, as in HF. `reference_experts` is HF's per-expert loop, kept as
the test oracle.

Shape suffixes: N tokens, D hidden, F expert intermediate, E experts, M routed (non-skip) tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from zaya_train.model.config import ZayaConfig
from zaya_train.model.router import ZayaRouter


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Probes `F.grouped_mm` once per (device, dtype): its support differs across CPU, CUDA and ROCm builds."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.ones(16, 16, device=device_type, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        F.grouped_mm(x, w, offs=torch.tensor([8, 16], device=device_type, dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


class ZayaExperts(nn.Module):
    """E SwiGLU experts stored as HF does: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))

    def forward(self, x_ND: torch.Tensor, ids_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        order_N = torch.argsort(ids_N, stable=True)
        counts_X = torch.bincount(ids_N, minlength=self.num_experts + 1)
        # The skip class has the largest id, so routed tokens come first in the sorted order.
        routed_M = order_N[: x_ND.shape[0] - int(counts_X[-1])]
        x_MD = x_ND.index_select(0, routed_M)
        counts_E = counts_X[: self.num_experts]
        h_MF2 = self._grouped_linear(x_MD, self.gate_up_proj, counts_E)
        gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
        y_MD = self._grouped_linear(F.silu(gate_MF) * up_MF, self.down_proj, counts_E)
        y_MD = y_MD * weight_N.index_select(0, routed_M)[:, None].to(y_MD.dtype)
        return x_ND.new_zeros(x_ND.shape).index_copy(0, routed_M, y_MD)

    @staticmethod
    def _grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if grouped_mm_supported(x_MI.device.type, x_MI.dtype):
            offsets = counts_E.cumsum(0).to(torch.int32)
            return F.grouped_mm(x_MI, w_EOI.transpose(1, 2), offs=offsets)
        pieces = torch.split(x_MI, counts_E.tolist())
        return torch.cat([piece @ w_EOI[e].T for e, piece in enumerate(pieces)])


def reference_experts(experts: ZayaExperts, x_ND: torch.Tensor, ids_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """HF's expert loop (index per expert, index_add back): the oracle for the grouped dispatch."""
    out_ND = torch.zeros_like(x_ND)
    for e in range(experts.num_experts):
        token_idx = torch.where(ids_N == e)[0]
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x_ND[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[e]) * weight_N[token_idx, None].to(x_ND.dtype)
        out_ND.index_add_(0, token_idx, y)
    return out_ND


class ZayaSparseMoeBlock(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate = ZayaRouter(config, layer_idx)
        self.experts = ZayaExperts(config)

    def forward(
        self, x_BSD: torch.Tensor, prev_state_BSR: torch.Tensor | None, replay_ids_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B,S,D], class ids [B,S], router state for the next layer)."""
        ids_BS, weight_BS, state_BSR = self.gate(x_BSD, prev_state_BSR, replay_ids_BS)
        out_ND = self.experts(x_BSD.flatten(0, 1), ids_BS.flatten(), weight_BS.flatten())
        return out_ND.view_as(x_BSD), ids_BS, state_BSR
