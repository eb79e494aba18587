"""Compressed Convolutional Attention (CCA; arXiv 2510.04476) in the form ZAYA1 uses (ZAYA1-8B technical report,
arXiv 2605.05365, App. C).

q/k are down-projected, mixed over time by a depthwise then a head-grouped causal convolution, given "mean"
skips, L2-normalised to sqrt(d) (keys times a learned per-KV-head `temp`), partially rotated and attended with
GQA. Half the value channels come from the current token, half from the previous one.

The two convolutions are applied as one: a depthwise conv followed by a grouped conv is a single grouped
causal conv over `cca_time0 + cca_time1 - 1` taps whose kernel is the two kernels convolved (plus a constant
from their biases). Plain rows run it as one `conv1d`; packed rows run it tap by tap so that a tap reaching
into an earlier document can be zeroed for the positions it would cross into, which makes packing exact.

On the Triton path (`kernels`, from ZayaConfig.kernels) the convolution, the skips and the QK norm run fused
(zaya_train.kernels.cca) whenever there is no decode cache; this file's ops are their reference.

Shape suffixes: B batch, S sequence, D hidden, C conv channels (q + k latent), H conv groups (query + KV heads),
T taps, d head dim (i in, o out), Q query heads, G KV heads, g queries per KV head, V value channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zaya_train.kernels.dispatch import use_triton
from zaya_train.kernels.linear import linear
from zaya_train.model.attention import attention
from zaya_train.model.cache import ZayaCache
from zaya_train.model.config import ZayaConfig
from zaya_train.model.layers import Linear, apply_partial_rope
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
        self.q_proj = Linear(config.hidden_size, config.query_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, config.kv_dim, bias=bias)
        self.v_proj_current = Linear(config.hidden_size, config.kv_dim // 2, bias=bias)
        self.v_proj_delayed = Linear(config.hidden_size, config.kv_dim // 2, bias=bias)
        channels = config.query_dim + config.kv_dim
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, self.time0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, self.time1, groups=self.num_heads + self.num_kv_heads)
        self._fused_key: tuple | None = None
        self._fused: tuple = ()

    def composed_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two convolutions as one grouped causal conv: weight [C, d, T] (tap j reads input t - (T-1) + j,
        the full convolution of the two kernels) and bias [C] (the second conv applied to the first one's bias)."""
        groups, d = self.num_heads + self.num_kv_heads, self.head_dim
        w0_HiK = self.conv_qk_depthwise.weight.view(groups, d, self.time0)
        w1_HoiK = self.conv_qk_grouped.weight.view(groups, d, d, self.time1)
        weight_HoiT = w1_HoiK.new_zeros(groups, d, d, self.num_taps)
        for j0 in range(self.time0):
            for j1 in range(self.time1):
                weight_HoiT[..., j0 + j1] += w1_HoiK[..., j1] * w0_HiK[:, None, :, j0]
        b0_Hi = self.conv_qk_depthwise.bias.view(groups, d)
        bias_Ho = self.conv_qk_grouped.bias.view(groups, d) + torch.einsum("hoik,hi->ho", w1_HoiK, b0_Hi)
        return weight_HoiT.reshape(groups * d, d, self.num_taps), bias_Ho.reshape(groups * d)

    def forget_fused_weights(self) -> None:
        """Drops the cached fused weights, for weights changed in ways their version counters miss (writes through
        `.data`, replaced Parameters)."""
        self._fused_key, self._fused = None, ()

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(q|k|v_cur|v_del weight, bias, composed conv weight, conv bias). Without autograd (decoding) they are
        built once per weight update and reused: rebuilding them every decode step would copy every projection
        matrix once per generated token."""
        params = [p for p in self.parameters()]
        if not torch.is_grad_enabled():
            key = tuple((p.data_ptr(), p._version) for p in params)
            if self._fused_key == key:
                return self._fused
        linears = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if self.q_proj.bias is not None else None
        fused = (weight, bias, *self.composed_conv())
        if not torch.is_grad_enabled():
            self._fused_key, self._fused = key, fused
        return fused

    def projections(self, x_BSD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """q/k pre-conv projections [B,S,C], current and delayed value projections [B,S,V], as one matmul."""
        qk_dim = self.q_proj.out_features + self.k_proj.out_features
        v_dim = self.v_proj_current.out_features
        return linear(x_BSD, weight, bias).split([qk_dim, v_dim, v_dim], dim=-1)

    def causal_conv(
        self, qk_pre_BSC: torch.Tensor, weight_CdT: torch.Tensor, bias_C: torch.Tensor, layout: SequenceLayout,
        cache: ZayaCache | None,
    ) -> torch.Tensor:
        """The composed q/k convolution [B,S,C]. The prefix is the cached past columns (zeros at a sequence
        start). Packed rows zero, per output position, every tap that reaches into an earlier document."""
        batch, seq_len, channels = qk_pre_BSC.shape
        history = self.num_taps - 1
        if cache is not None and cache.get_seq_length() > 0:
            prefix_BPC = cache.conv_state[self.layer_idx]
        else:
            prefix_BPC = qk_pre_BSC.new_zeros(batch, history, channels)
        groups = self.num_heads + self.num_kv_heads
        if layout.shift_valid_TBS is None:
            # Channels-first and contiguous: conv1d's backward is several times slower on a transposed view.
            padded_BCP = torch.cat([prefix_BPC.transpose(1, 2), qk_pre_BSC.transpose(1, 2)], dim=2)
            if cache is not None:
                # A contiguous copy: the cache does not keep the whole prefill buffer alive, and conv states have
                # one layout wherever they come from (a compiled decode step guards on strides).
                state_BPC = padded_BCP[:, :, padded_BCP.shape[2] - history :].transpose(1, 2)
                cache.conv_state[self.layer_idx] = state_BPC.clone(memory_format=torch.contiguous_format)
            out_BCS = F.conv1d(padded_BCP, weight_CdT, bias_C, groups=groups)
            # Back to [B, S, C] memory order: q/k inherit it, and SDPA's fast kernels need d contiguous.
            return out_BCS.transpose(1, 2).contiguous()
        padded_BPC = torch.cat([prefix_BPC, qk_pre_BSC], dim=1)
        if cache is not None:
            state_BPC = padded_BPC[:, padded_BPC.shape[1] - history :]
            cache.conv_state[self.layer_idx] = state_BPC.clone(memory_format=torch.contiguous_format)
        weight_HoiT = weight_CdT.view(groups, self.head_dim, self.head_dim, self.num_taps)
        out_BSHd = bias_C.view(groups, self.head_dim).expand(batch, seq_len, groups, self.head_dim)
        for shift in range(self.num_taps):
            x_BSC = padded_BPC[:, history - shift : history - shift + seq_len]
            if shift:
                x_BSC = x_BSC * layout.shift_valid_TBS[shift - 1][..., None].to(x_BSC.dtype)
            x_BSHd = x_BSC.view(batch, seq_len, groups, self.head_dim)
            out_BSHd = out_BSHd + torch.einsum("bshi,hoi->bsho", x_BSHd, weight_HoiT[..., history - shift])
        return out_BSHd.reshape(batch, seq_len, channels)

    def conv_with_skips(
        self, qk_pre_BSC: torch.Tensor, weight_CdT: torch.Tensor, bias_C: torch.Tensor, layout: SequenceLayout,
        cache: ZayaCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm q [B,S,Q,d] and k [B,S,G,d] (fp32): the composed convolution plus the mean skips."""
        batch, seq_len, _ = qk_pre_BSC.shape
        q_dim = self.num_heads * self.head_dim

        # Mean skips (fp32): every query head averages with its KV head; each KV head takes its group's mean.
        group = self.num_heads // self.num_kv_heads
        q_res_BSGgd = qk_pre_BSC[..., :q_dim].float().view(batch, seq_len, self.num_kv_heads, group, self.head_dim)
        k_pre_BSG1d = qk_pre_BSC[..., q_dim:].float().view(batch, seq_len, self.num_kv_heads, 1, self.head_dim)
        q_res_BSGgd = 0.5 * (q_res_BSGgd + k_pre_BSG1d)
        k_res_BSGd = q_res_BSGgd.mean(dim=3)

        conv_BSC = self.causal_conv(qk_pre_BSC, weight_CdT, bias_C, layout, cache).float()
        q_BSQd = conv_BSC[..., :q_dim].view(batch, seq_len, self.num_heads, self.head_dim) + q_res_BSGgd.reshape(
            batch, seq_len, self.num_heads, self.head_dim
        )
        k_BSGd = conv_BSC[..., q_dim:].view(batch, seq_len, self.num_kv_heads, self.head_dim) + k_res_BSGd
        return q_BSQd, k_BSGd

    def forward(
        self, x_BSD: torch.Tensor, layout: SequenceLayout, cache: ZayaCache | None,
        norm_temp_G: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns pre-norm q [B,S,Q,d], k [B,S,G,d] (fp32) and v [B,S,G,d]. Given `norm_temp_G` (ZayaQKNorm's
        temp; the Triton path, without a cache) q and k come out normalised as ZayaQKNorm makes them, from the
        fused kernels of zaya_train.kernels.cca."""
        batch, seq_len, _ = x_BSD.shape
        if layout.pad_zero_mask_BS is not None:
            x_BSD = x_BSD * layout.pad_zero_mask_BS[..., None].to(x_BSD.dtype)
        proj_weight, proj_bias, conv_weight, conv_bias = self.fused_weights()
        qk_pre_BSC, v_cur_BSV, v_del_BSV = self.projections(x_BSD, proj_weight, proj_bias)
        if norm_temp_G is not None:
            from zaya_train.kernels.cca import cca_conv_qk

            q_BSQd, k_BSGd = cca_conv_qk(
                qk_pre_BSC, conv_weight, conv_bias, norm_temp_G, layout.shift_valid_TBS, self.num_heads
            )
        else:
            q_BSQd, k_BSGd = self.conv_with_skips(qk_pre_BSC, conv_weight, conv_bias, layout, cache)

        # Values: current channels from x_t, delayed channels from x_{t-1} (zero input before a sequence start).
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
        # "auto" | "triton" | "torch", set by the model from ZayaConfig.kernels: the Triton path fuses the q/k
        # convolution, skips and QK norm (zaya_train.kernels.cca); decoding with a cache keeps this file's ops.
        self.kernels = config.kernels
        self.qkv_proj = ZayaCCAProjection(config, layer_idx)
        self.qk_norm = ZayaQKNorm(config)
        self.o_proj = Linear(config.query_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        x_BSD: torch.Tensor,
        layout: SequenceLayout,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: ZayaCache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        if cache is None and use_triton("cca_conv_qk", self.kernels, x_BSD.device):
            q_BSQd, k_BSGd, v_BSGd = self.qkv_proj(x_BSD, layout, cache, self.qk_norm.temp)
        else:
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
