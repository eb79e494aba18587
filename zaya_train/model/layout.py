"""What every layer needs to know about the rows of one forward: positions, padding, document boundaries and
the attention masks, computed once per forward instead of once per layer.

Rows come in three forms:
- plain causal rows (the fast path: no mask tensor, SDPA's `is_causal`);
- left- or right-padded rows, given by a 2-D `attention_mask` (1 = token, 0 = padding), as HF takes them;
- packed rows holding several documents, given by `document_ids` [B, S] or by `cu_seqlens` over the flattened
  [B * S] token stream. Attention, both CCA convolutions and the value time shift stay inside a document, and
  positions restart at 0 in each document, so a packed row computes exactly what its documents would alone.
  A negative document id marks padding: it is its own document and is left out of the expert load counts.

Shape suffixes: B batch, S query length, K key length (past + S), T shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zaya_train.model.config import ZayaConfig


@dataclass
class SequenceLayout:
    position_ids_BS: torch.Tensor
    # HF's CCA "conv mask": padded positions of the normed input are zeroed before the q/k/v projections.
    pad_zero_mask_BS: torch.Tensor | None
    # token_mask_BS[b, s]: real token (not padding); used for expert load counts.
    token_mask_BS: torch.Tensor | None
    # shift_valid_TBS[t][b, s]: the input t steps back belongs to the same document as position s.
    shift_valid_TBS: list[torch.Tensor] | None
    # Boolean masks [B, 1, S, K] (True = attend) per layer type; None means plain causal attention.
    attn_masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # Document boundaries for varlen flash attention (packed rows only).
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    cu_seqlens = cu_seqlens.to(torch.long)
    total = batch * seq_len
    if cu_seqlens.ndim != 1 or cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != total:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at batch*seq_len={total}; got {cu_seqlens.tolist()}")
    if (cu_seqlens[1:] < cu_seqlens[:-1]).any():
        raise ValueError("cu_seqlens must be non-decreasing")
    row_starts = torch.arange(0, total, seq_len, device=cu_seqlens.device)
    if not torch.isin(row_starts, cu_seqlens).all():
        raise ValueError("cu_seqlens: a document crosses a row boundary; every row must start a new document")
    flat = torch.arange(total, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, flat, right=True) - 1).view(batch, seq_len)


def positions_from_documents(document_ids_BS: torch.Tensor) -> torch.Tensor:
    batch, seq_len = document_ids_BS.shape
    idx_BS = torch.arange(seq_len, device=document_ids_BS.device).expand(batch, seq_len)
    starts_BS = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    start_idx_BS = torch.where(starts_BS, idx_BS, torch.zeros_like(idx_BS)).cummax(dim=1).values
    return idx_BS - start_idx_BS


def build_layout(
    config: ZayaConfig,
    batch: int,
    seq_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    past_len: int,
    past_key_valid_BP: torch.Tensor | None,
) -> tuple[SequenceLayout, torch.Tensor | None]:
    """Returns the layout and the key-validity mask [B, K] to store in a cache (None when all keys are valid)."""
    if cu_seqlens is not None:
        if document_ids is not None:
            raise ValueError("pass either document_ids or cu_seqlens, not both")
        document_ids = document_ids_from_cu_seqlens(cu_seqlens, batch, seq_len)
    packed = document_ids is not None
    if packed:
        if document_ids.shape != (batch, seq_len):
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(batch, seq_len)}")
        if past_len:
            raise ValueError("packed rows (document_ids / cu_seqlens) cannot continue a decode cache")
        if attention_mask is not None:
            raise ValueError("packed rows take document_ids or cu_seqlens, not an attention_mask")
        document_ids = document_ids.to(device)

    # Key validity over past + current keys.
    key_valid_BK = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask.shape == (batch, past_len + seq_len):
            key_valid_BK = attention_mask
        elif attention_mask.shape == (batch, seq_len):
            past = past_key_valid_BP if past_key_valid_BP is not None else attention_mask.new_ones(batch, past_len)
            key_valid_BK = torch.cat([past, attention_mask], dim=1)
        else:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)} or "
                f"{(batch, past_len + seq_len)} (past + current tokens)"
            )
    elif past_key_valid_BP is not None:
        key_valid_BK = torch.cat([past_key_valid_BP, past_key_valid_BP.new_ones(batch, seq_len)], dim=1)
    if key_valid_BK is not None and bool(key_valid_BK.all()):
        key_valid_BK = None
    token_mask_BS = key_valid_BK[:, past_len:] if key_valid_BK is not None else None
    if packed and bool((document_ids < 0).any()):
        token_mask_BS = document_ids >= 0

    if position_ids is None:
        if packed:
            position_ids = positions_from_documents(document_ids)
        else:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device).expand(batch, seq_len)
    else:
        position_ids = position_ids.to(device)
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.expand(batch, seq_len)

    shift_valid = None
    cu = None
    max_seqlen = 0
    if packed:
        shift_valid = []
        for shift in range(1, max(config.conv_state_len, 1) + 1):
            valid_BS = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
            valid_BS[:, shift:] = document_ids[:, shift:] == document_ids[:, :-shift]
            shift_valid.append(valid_BS)
        starts = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        start_flat = starts.flatten().nonzero().flatten()
        cu = torch.cat([start_flat, start_flat.new_tensor([batch * seq_len])]).to(torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max())

    layout = SequenceLayout(
        position_ids_BS=position_ids,
        pad_zero_mask_BS=token_mask_BS if (token_mask_BS is not None and seq_len > 1 and not packed) else None,
        token_mask_BS=token_mask_BS,
        shift_valid_TBS=shift_valid,
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
    )
    key_len = past_len + seq_len
    for layer_type in set(config.layer_types):
        window = config.sliding_window if layer_type == "hybrid_sliding" else None
        layout.attn_masks[layer_type] = _attention_mask(
            batch, seq_len, key_len, device, key_valid_BK, document_ids, window
        )
    return layout, key_valid_BK


def _attention_mask(
    batch: int,
    seq_len: int,
    key_len: int,
    device: torch.device,
    key_valid_BK: torch.Tensor | None,
    document_ids_BS: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor | None:
    past_len = key_len - seq_len
    windowed = window is not None and window < key_len
    if key_valid_BK is None and document_ids_BS is None and not windowed and (past_len == 0 or seq_len == 1):
        return None  # plain causal (or one query over all keys): no mask tensor
    q_pos = torch.arange(past_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    mask_SK = k_pos <= q_pos
    if windowed:
        mask_SK = mask_SK & (k_pos > q_pos - window)
    mask_BSK = mask_SK.expand(batch, seq_len, key_len)
    if key_valid_BK is not None:
        mask_BSK = mask_BSK & key_valid_BK[:, None, :]
    if document_ids_BS is not None:
        mask_BSK = mask_BSK & (document_ids_BS[:, :, None] == document_ids_BS[:, None, :])
    # A padding query would otherwise see no key at all (NaN softmax); letting it see itself keeps its
    # (ignored) output finite, so nothing non-finite can leak into real tokens.
    mask_BSK = mask_BSK | (q_pos == k_pos)
    return mask_BSK[:, None]
