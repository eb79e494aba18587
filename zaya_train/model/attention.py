"""Softmax attention backends: flash-attn (varlen for packed rows) where installed on a GPU, else PyTorch SDPA.

Shape suffixes: B batch, H query heads, G KV heads, S queries, K keys, d head dim, N packed tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zaya_train.model.layout import SequenceLayout


@functools.cache
def _flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def attention(
    q_BHSd: torch.Tensor,
    k_BGKd: torch.Tensor,
    v_BGKd: torch.Tensor,
    mask_B1SK: torch.Tensor | None,
    layout: SequenceLayout,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention; returns [B, S, H, d]."""
    seq_len, key_len = q_BHSd.shape[2], k_BGKd.shape[2]
    flash = _flash_attn() if q_BHSd.is_cuda and q_BHSd.dtype in (torch.bfloat16, torch.float16) else None
    if flash is not None and layout.token_mask_BS is None and seq_len == key_len:
        flash_attn_func, flash_attn_varlen_func = flash
        window_size = (window - 1, 0) if window is not None else (-1, -1)
        q, k, v = (t.transpose(1, 2) for t in (q_BHSd, k_BGKd, v_BGKd))
        if layout.cu_seqlens is not None:
            batch = q.shape[0]
            out_NHd = flash_attn_varlen_func(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), layout.cu_seqlens, layout.cu_seqlens,
                layout.max_seqlen, layout.max_seqlen, softmax_scale=scale, causal=True, window_size=window_size,
            )
            return out_NHd.view(batch, seq_len, *out_NHd.shape[1:])
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size)
    is_causal = mask_B1SK is None and seq_len == key_len and seq_len > 1
    out_BHSd = F.scaled_dot_product_attention(
        q_BHSd, k_BGKd, v_BGKd, attn_mask=mask_B1SK, is_causal=is_causal, scale=scale,
        enable_gqa=q_BHSd.shape[1] != k_BGKd.shape[1],
    )
    return out_BHSd.transpose(1, 2)

