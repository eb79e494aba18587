"""The ZAYA1 decode cache: per layer the post-RoPE keys and values, the last `cca_time0 + cca_time1 - 2` q/k
projection columns (conv state) and the previous token's delayed value projection.

Keys and values live in buffers that grow by doubling, so a decode step writes in place instead of
concatenating. Rows can be dropped or reordered (`select`) when sequences finish, and another cache's rows
appended (`extend`) when new requests join a running batch.

Shape suffixes: B batch, G KV heads, L capacity, d head dim, P conv history, C conv channels, V value channels.
"""

from __future__ import annotations

import torch

from zaya_train.model.config import ZayaConfig


class ZayaCache:
    def __init__(self, config: ZayaConfig, initial_capacity: int = 256) -> None:
        self.num_layers = config.num_hidden_layers
        self.initial_capacity = initial_capacity
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self.conv_state: list[torch.Tensor | None] = [None] * self.num_layers
        self.value_state: list[torch.Tensor | None] = [None] * self.num_layers
        # key_valid_BL[b, t]: key t of row b is a real token (None while every key is real).
        self.key_valid: torch.Tensor | None = None
        self.seq_len = 0

    def get_seq_length(self) -> int:
        return self.seq_len

    @property
    def batch_size(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[0]

    def update_kv(self, layer: int, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends this forward's keys/values at `seq_len` and returns all keys/values so far."""
        end = self.seq_len + k_BGSd.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if torch.is_grad_enabled() and (k_BGSd.requires_grad or v_BGSd.requires_grad):
            # Under autograd, writes into a buffer make the backward copy the whole buffer once per write
            # (CopySlices, as_strided views); a concatenation's backward is a split.
            if buf_k is not None:
                k_BGSd = torch.cat([buf_k[:, :, : self.seq_len], k_BGSd], dim=2)
                v_BGSd = torch.cat([buf_v[:, :, : self.seq_len], v_BGSd], dim=2)
            self.keys[layer], self.values[layer] = k_BGSd, v_BGSd
            return k_BGSd, v_BGSd
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(self.initial_capacity, end, 2 * (0 if buf_k is None else buf_k.shape[2]))
            new_k = k_BGSd.new_empty(*k_BGSd.shape[:2], capacity, k_BGSd.shape[3])
            new_v = v_BGSd.new_empty(*v_BGSd.shape[:2], capacity, v_BGSd.shape[3])
            if buf_k is not None:
                new_k[:, :, : self.seq_len] = buf_k[:, :, : self.seq_len]
                new_v[:, :, : self.seq_len] = buf_v[:, :, : self.seq_len]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.seq_len : end] = k_BGSd
        buf_v[:, :, self.seq_len : end] = v_BGSd
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, num_tokens: int, key_valid_BL: torch.Tensor | None) -> None:
        """Called once per forward after every layer has written its state."""
        self.seq_len += num_tokens
        self.key_valid = key_valid_BL

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (indices into the batch), in that order."""
        for states in (self.keys, self.values, self.conv_state, self.value_state):
            for layer, state in enumerate(states):
                if state is not None:
                    states[layer] = state.index_select(0, rows)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, rows)

    def extend(self, other: ZayaCache, capacity: int = 0) -> None:
        """Appends `other`'s rows after this cache's rows, as when requests join a running decode batch.

        Rows stay right-aligned (their last key in the last column): the shorter cache is left-padded with
        invalid keys, so relative key distances, and with them sliding windows, are unchanged. Leading columns
        that are padding in every row of a cache are dropped first. Padded key/value slots are zeroed (never
        garbage) because masked attention still multiplies them by a zero weight. Conv and value states are
        per row and are concatenated. `capacity` reserves room for that many keys in total, so the decode
        steps that follow write in place instead of regrowing the buffers."""
        parts = [cache for cache in (self, other) if cache.batch_size > 0]
        if not parts:
            return
        valid_BK = [
            cache.key_valid if cache.key_valid is not None
            else torch.ones(cache.batch_size, cache.seq_len, dtype=torch.bool, device=cache.keys[0].device)
            for cache in parts
        ]
        # First column holding a real key in some row; everything left of it is padding for the whole cache.
        leads = [int(valid.any(dim=0).int().argmax()) for valid in valid_BK]
        lengths = [cache.seq_len - lead for cache, lead in zip(parts, leads)]
        new_len = max(lengths)
        total_rows = sum(cache.batch_size for cache in parts)
        row_slices, start = [], 0
        for cache in parts:
            row_slices.append(slice(start, start + cache.batch_size))
            start += cache.batch_size

        for states in ("keys", "values"):
            merged = []
            for layer in range(self.num_layers):
                first = getattr(parts[0], states)[layer]
                buf_BGLd = first.new_zeros(total_rows, first.shape[1], max(new_len, capacity), first.shape[3])
                for cache, rows, lead, length in zip(parts, row_slices, leads, lengths):
                    src_BGLd = getattr(cache, states)[layer]
                    buf_BGLd[rows, :, new_len - length : new_len] = src_BGLd[:, :, lead : cache.seq_len]
                merged.append(buf_BGLd)
            setattr(self, states, merged)
        for states in ("conv_state", "value_state"):
            setattr(self, states, [torch.cat([getattr(c, states)[i] for c in parts]) for i in range(self.num_layers)])

        key_valid_BL = valid_BK[0].new_zeros(total_rows, new_len)
        for valid, rows, lead, length in zip(valid_BK, row_slices, leads, lengths):
            key_valid_BL[rows, new_len - length :] = valid[:, lead:]
        self.key_valid = None if bool(key_valid_BL.all()) else key_valid_BL
        self.seq_len = new_len
