"""The ZAYA1 decode cache: per layer the post-RoPE keys and values, the last `cca_time0 + cca_time1 - 2` q/k
projection columns (conv state) and the previous token's delayed value projection.

Keys and values live in buffers that grow by doubling, so a decode step writes in place instead of
concatenating. Rows can be dropped or reordered (`select`) when sequences finish.

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
