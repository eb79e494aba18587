"""Small building blocks shared by the ZAYA1 modules: RMSNorm, learned residual scaling, partial RoPE.

Shape suffixes: B batch, S sequence, H heads, D hidden, d head dim, R rotary dim.
"""

from __future__ import annotations

import torch
from torch import nn


class ZayaRMSNorm(nn.Module):
    """RMSNorm with fp32 statistics; the output is cast to the weight's dtype (the compute dtype)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class ZayaResidualScaling(nn.Module):
    """Merges a sublayer output into the residual stream: (h + b_h) * s_h + (r + b_r) * s_r, in fp32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden_size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden_size))
        self.residual_scale = nn.Parameter(torch.ones(hidden_size))
        self.residual_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_BSD: torch.Tensor, residual_BSD: torch.Tensor) -> torch.Tensor:
        hidden_BSD = (hidden_BSD.float() + self.hidden_states_bias) * self.hidden_states_scale
        return hidden_BSD + (residual_BSD + self.residual_bias) * self.residual_scale


def rope_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(position_ids_BS: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, R] for NeoX-style (rotate-half) RoPE, in fp32."""
    freqs_BSR2 = position_ids_BS[..., None].float() * inv_freq.to(position_ids_BS.device)
    emb_BSR = torch.cat((freqs_BSR2, freqs_BSR2), dim=-1)
    return emb_BSR.cos(), emb_BSR.sin()


def apply_partial_rope(x_BSHd: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotates the first R channels of every head; the remaining channels carry no position."""
    rotary_dim = cos_BSR.shape[-1]
    x_rot, x_pass = x_BSHd[..., :rotary_dim], x_BSHd[..., rotary_dim:]
    cos, sin = cos_BSR[:, :, None, :], sin_BSR[:, :, None, :]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
