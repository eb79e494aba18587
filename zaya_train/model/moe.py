"""Top-1 SwiGLU experts with sort-based grouped dispatch, and the ZAYA1 MoE block (router + experts).

Dispatch: tokens are sorted by expert id and every expert runs on its contiguous slice
(`zaya_train.kernels.linear.grouped_linear`: one `F.grouped_mm` where the device and dtype support it, one
oneDNN GEMM per expert in fp32 on CPU, else one GEMM per expert; a loop over experts, never over tokens);
outputs are weighted and scattered back.
Tokens routed to the skip class produce zero, as in HF. `reference_experts` is HF's per-expert loop, kept as
the test oracle.

Shape suffixes: N tokens, D hidden, F expert intermediate, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zaya_train.kernels.dispatch import use_triton
from zaya_train.kernels.linear import grouped_linear
from zaya_train.model.config import ZayaConfig
from zaya_train.model.router import ZayaRouter


class ZayaExperts(nn.Module):
    """E SwiGLU experts stored as HF does: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    `kernels` (set by the model from ZayaConfig.kernels) chooses the Triton kernels (zaya_train.kernels.moe)
    or the PyTorch ops below, their reference (see zaya_train.kernels.dispatch)."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.kernels = config.kernels
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))

    def forward(self, x_ND: torch.Tensor, ids_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        if use_triton("moe_experts", self.kernels, x_ND.device):
            from zaya_train.kernels.moe import moe_experts

            return moe_experts(x_ND, ids_N, weight_N, self.gate_up_proj, self.down_proj)
        # Skip-class tokens run through expert 0 with weight 0 (output exactly 0, no gradient), as in HF: the
        # shapes then never depend on the routing, so GPU dispatch needs no host sync and compiles to one graph.
        skip_N = ids_N == self.num_experts
        ids_N = ids_N.masked_fill(skip_N, 0)
        weight_N = weight_N.masked_fill(skip_N, 0.0)
        order_N = torch.argsort(ids_N, stable=True)
        # Not bincount, whose output size depends on the data (torch.compile cannot trace it).
        counts_E = ids_N.new_zeros(self.num_experts).scatter_add_(0, ids_N, torch.ones_like(ids_N))
        xs_ND = x_ND.index_select(0, order_N)
        h_NF2 = grouped_linear(xs_ND, self.gate_up_proj, counts_E)
        gate_NF, up_NF = h_NF2.chunk(2, dim=-1)
        y_ND = grouped_linear(F.silu(gate_NF) * up_NF, self.down_proj, counts_E)
        y_ND = y_ND * weight_N.index_select(0, order_N)[:, None].to(y_ND.dtype)
        return torch.empty_like(y_ND).index_copy(0, order_N, y_ND)


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B,S,D], class ids [B,S], router state for the next layer, the router's own class
        ids [B,S]: the class ids unless replayed)."""
        ids_BS, weight_BS, state_BSR, own_ids_BS = self.gate(x_BSD, prev_state_BSR, replay_ids_BS)
        out_ND = self.experts(x_BSD.flatten(0, 1), ids_BS.flatten(), weight_BS.flatten())
        return out_ND.view_as(x_BSD), ids_BS, state_BSR, own_ids_BS
