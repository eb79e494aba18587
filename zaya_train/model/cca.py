"""Compressed Convolutional Attention (CCA) as in ZAYA1 (zaya1-spec.md section 3).

q/k are down-projected, mixed over time by a depthwise then a head-grouped causal convolution, given "mean"
skips, L2-normalised to sqrt(d) (keys times a learned per-KV-head `temp`), partially rotated and attended with
GQA. Half the value channels come from the current token, half from the previous one.

The two convolutions are applied as one: a depthwise conv followed by a grouped conv is a single grouped
causal conv over `cca_time0 + cca_time1 - 1` taps whose kernel is composed from the two (plus a constant from
their biases). Written that way it is one batched matmul over time-shifted inputs, and a shifted input can be
zeroed where it comes from another document, which is what makes packed rows exact.

Shape suffixes: B batch, S sequence, D hidden, C conv channels (q + k latent), H conv groups (query + KV heads),
T taps, d head dim, Q query heads, G KV heads, V value channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zaya_train.model.attention import attention
from zaya_train.model.cache import ZayaCache
from zaya_train.model.config import ZayaConfig
from zaya_train.model.layers import apply_partial_rope
from zaya_train.model.layout import SequenceLayout


class ZayaCCAProjection(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.time0, self.time1 = config.cca_time0, config.cca_time1
        self.num_taps = self.time0 + self.time1 - 1
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.query_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=bias)
        self.v_proj_current = nn.Linear(config.hidden_size, config.kv_dim // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(config.hidden_size, config.kv_dim // 2, bias=bias)
        channels = config.query_dim + config.kv_dim
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, self.time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, self.time1, groups=self.num_heads + self.num_kv_heads)

    def composed_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two convolutions as one: kernel [H, T*d, d] over taps (tap t = input t steps back) and bias [H, d]."""
        groups, d = self.num_heads + self.num_kv_heads, self.head_dim
        w0_HdK = self.conv_qk_depthwise.weight.view(groups, d, self.time0)
        w1_HoiK = self.conv_qk_grouped.weight.view(groups, d, d, self.time1)
        kernel_HTio = w1_HoiK.new_zeros(groups, self.num_taps, d, d)
        for j0 in range(self.time0):
            for j1 in range(self.time1):
                tap = (self.time0 - 1 - j0) + (self.time1 - 1 - j1)
                kernel_HTio[:, tap] += (w1_HoiK[..., j1] * w0_HdK[:, None, :, j0]).transpose(1, 2)
        b0_Hd = self.conv_qk_depthwise.bias.view(groups, d)
        bias_Hd = self.conv_qk_grouped.bias.view(groups, d) + torch.einsum("hoik,hi->ho", w1_HoiK, b0_Hd)
        return kernel_HTio.reshape(groups, self.num_taps * d, d), bias_Hd

    def forward(
        self, x_BSD: torch.Tensor, layout: SequenceLayout, cache: ZayaCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns pre-norm q [B,S,Q,d], k [B,S,G,d] (fp32) and v [B,S,G,d]."""
        batch, seq_len, _ = x_BSD.shape
        if layout.pad_zero_mask_BS is not None:
            x_BSD = x_BSD * layout.pad_zero_mask_BS[..., None].to(x_BSD.dtype)
        q_pre_BSC = self.q_proj(x_BSD)
        k_pre_BSC = self.k_proj(x_BSD)
        qk_pre_BSC = torch.cat([q_pre_BSC, k_pre_BSC], dim=-1)

        # Mean skips (fp32): every query head averages with its KV head; each KV head takes its group's mean.
        group = self.num_heads // self.num_kv_heads
        q_res_BSQd = q_pre_BSC.float().view(batch, seq_len, self.num_heads, self.head_dim)
        k_res_BSGd = k_pre_BSC.float().view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q_res_BSQd = 0.5 * (q_res_BSQd + k_res_BSGd.repeat_interleave(group, dim=2))
        k_res_BSGd = q_res_BSQd.view(batch, seq_len, self.num_kv_heads, group, self.head_dim).mean(dim=3)

        # Causal conv over taps; the prefix is the cached past columns (zeros at a sequence start).
        history = self.num_taps - 1
        if cache is not None and cache.get_seq_length() > 0:
            prefix_BPC = cache.conv_state[self.layer_idx]
        else:
            prefix_BPC = qk_pre_BSC.new_zeros(batch, history, qk_pre_BSC.shape[-1])
        padded_BPC = torch.cat([prefix_BPC, qk_pre_BSC], dim=1)
        if cache is not None:
            cache.conv_state[self.layer_idx] = padded_BPC[:, padded_BPC.shape[1] - history :]
        taps = []
        for tap in range(self.num_taps):
            shifted_BSC = padded_BPC[:, history - tap : history - tap + seq_len]
            if tap and layout.shift_valid_TBS is not None:
                shifted_BSC = shifted_BSC * layout.shift_valid_TBS[tap - 1][..., None].to(shifted_BSC.dtype)
            taps.append(shifted_BSC)
        groups = self.num_heads + self.num_kv_heads
        taps_NHTd = torch.stack(taps, dim=2).view(batch * seq_len, self.num_taps, groups, self.head_dim)
        taps_HNk = taps_NHTd.permute(2, 0, 1, 3).reshape(groups, batch * seq_len, self.num_taps * self.head_dim)
        kernel_Hko, bias_Hd = self.composed_conv()
        conv_HNd = torch.baddbmm(bias_Hd[:, None, :], taps_HNk, kernel_Hko)
        conv_BSHd = conv_HNd.permute(1, 0, 2).view(batch, seq_len, groups, self.head_dim).float()
        q_BSQd = conv_BSHd[:, :, : self.num_heads] + q_res_BSQd
        k_BSGd = conv_BSHd[:, :, self.num_heads :] + k_res_BSGd

        # Values: current channels from x_t, delayed channels from x_{t-1} (zero input before a sequence start).
        v_cur_BSV = self.v_proj_current(x_BSD)
        v_del_BSV = self.v_proj_delayed(x_BSD)
        empty_V = self.v_proj_delayed.bias if self.v_proj_delayed.bias is not None else v_del_BSV.new_zeros(v_del_BSV.shape[-1])
        if cache is not None and cache.get_seq_length() > 0:
            prev_B1V = cache.value_state[self.layer_idx][:, None]
        else:
            prev_B1V = empty_V.expand(batch, 1, -1).to(v_del_BSV.dtype)
        shifted_BSV = torch.cat([prev_B1V, v_del_BSV[:, :-1]], dim=1)
        if layout.shift_valid_TBS is not None:
            shifted_BSV = torch.where(layout.shift_valid_TBS[0][..., None], shifted_BSV, empty_V.to(shifted_BSV.dtype))
        if cache is not None:
            cache.value_state[self.layer_idx] = v_del_BSV[:, -1]
        v_BSGd = torch.cat([v_cur_BSV, shifted_BSV], dim=-1).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        return q_BSQd, k_BSGd, v_BSGd


class ZayaQKNorm(nn.Module):
    """L2-normalises q and k to norm sqrt(d) in fp32; keys are then scaled by a raw per-KV-head `temp`."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.scale = config.head_dim**0.5
        self.temp = nn.Parameter(torch.full((config.num_key_value_heads,), float(config.temp_init)))

    def forward(self, q_BSQd: torch.Tensor, k_BSGd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.finfo(torch.float32).eps
        q_BSQd = q_BSQd.float()
        k_BSGd = k_BSGd.float()
        q_BSQd = q_BSQd * (self.scale / q_BSQd.norm(dim=-1, keepdim=True).clamp_min(eps))
        k_BSGd = k_BSGd * (self.scale / k_BSGd.norm(dim=-1, keepdim=True).clamp_min(eps))
        return q_BSQd, k_BSGd * self.temp.float()[None, None, :, None]


class ZayaAttention(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.window = config.sliding_window if self.layer_type == "hybrid_sliding" else None
        self.head_dim = config.head_dim
        self.qkv_proj = ZayaCCAProjection(config, layer_idx)
        self.qk_norm = ZayaQKNorm(config)
        self.o_proj = nn.Linear(config.query_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        x_BSD: torch.Tensor,
        layout: SequenceLayout,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: ZayaCache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        q_BSQd, k_BSGd, v_BSGd = self.qkv_proj(x_BSD, layout, cache)
        q_BSQd, k_BSGd = self.qk_norm(q_BSQd, k_BSGd)
        cos, sin = rope
        dtype = x_BSD.dtype
        q_BSQd = apply_partial_rope(q_BSQd, cos, sin).to(dtype)
        k_BSGd = apply_partial_rope(k_BSGd, cos, sin).to(dtype)
        q_BQSd, k_BGSd, v_BGSd = (t.transpose(1, 2) for t in (q_BSQd, k_BSGd, v_BSGd))
        if cache is not None:
            k_BGSd, v_BGSd = cache.update_kv(self.layer_idx, k_BGSd, v_BGSd)
        out_BSQd = attention(
            q_BQSd, k_BGSd, v_BGSd, layout.attn_masks[self.layer_type], layout, self.window, self.head_dim**-0.5
        )
        return self.o_proj(out_BSQd.reshape(batch, seq_len, -1))
