"""The single-token decode step: what `ZayaForCausalLM.forward` computes for one new token per row on a
`ZayaCache`, with the work per step cut to what one token needs.

A decode step is hundreds of tiny ops, so its time is op count, not FLOPs. What this step saves against the
general forward (which also handles prompts, padding and packed rows):
- no layout: the key mask is built once per step and shared by every layer of a type;
- the two CCA convolutions, already composed into one kernel, run as one batched matmul over the conv state;
- q and k are normalised, scaled (`temp`) and rotated as one [B, Q + G, d] tensor; attention is two matmuls;
- the residual merges' constant terms (b_h * s_h + b_r * s_r) are built with the other weights, not per step;
- when every expert on every row costs fewer FLOPs than a GEMM call per expert (small batches, small experts,
  as in `nano`), the experts run densely: one GEMM for all gate/up projections, one for all down projections
  with every row's non-chosen experts weighted zero. Otherwise the grouped dispatch of `ZayaExperts` runs.
Every weight rearrangement is built once per weight update: it is keyed on the storage and version counter of
the tensors it comes from, which in-place updates (`load_state_dict`, `.to()`, optimizer steps through autograd-
visible ops) change. Writes through `.data` and replaced Parameters are invisible to that key: call
`invalidate()` after them (`RolloutEngine.load_weights` does). Parameters partitioned by ZeRO-3 are not gathered
here; `RolloutEngine` decodes those through the general forward.

`compile=True` runs the step's tensor work through torch.compile (inductor, dynamic shapes), which fuses those
hundreds of ops into a few dozen kernels: at nano size, 128 rows, a step takes about 60% of the eager one's time on
the development CPU. One graph serves every batch size and key length (a lone row runs eager: size-1 dims are
specialised); the experts always take the grouped dispatch there, as one opaque op
(`zaya_train.kernels.linear.grouped_linear`). Logits differ from the eager step's by float rounding.

    from zaya_train.model.decode import DecodeStep
    step = DecodeStep(model)                                # model: a ZayaForCausalLM; compile=True to compile
    logits_BV, expert_ids_BL = step(tokens_B, positions_B, cache)   # cache filled by a prefill forward

Shape suffixes: B rows, D hidden, C conv channels (q + k latent), H conv groups (Q + G), T taps, d head dim,
Q query heads, G KV heads, g queries per KV head, K keys, V vocab, E experts, F expert intermediate, R router
latent, X router classes, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config

from zaya_train.kernels.linear import linear
from zaya_train.model.cache import ZayaCache
from zaya_train.model.layers import merge_residual, partial_rope, rope_cos_sin
from zaya_train.model.model import ZayaDecoderLayer, ZayaForCausalLM

# Dense experts when (E - 1) * B * D * F <= this * E: on the development CPU a GEMM call costs about as much
# as 1M multiply-adds, so below this the E-fold FLOPs of dense experts cost less than one call per expert.
DENSE_EXPERT_MACS_PER_EXPERT = 2**20


@dataclass
class _LayerWeights:
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    conv_weight_HId: torch.Tensor  # [H, T*d, d]: row (t, i) of group h maps input channel i at tap t
    conv_bias_Hd: torch.Tensor
    qk_scale_H1: torch.Tensor  # sqrt(d) for queries, sqrt(d) * temp for keys
    # (bias, s_h, s_r) of the two residual merges: the bias term is constant between weight updates.
    attn_merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    mlp_merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    # Only for models small enough to run dense experts (a copy of every expert's weights otherwise).
    gate_up_weight: torch.Tensor | None  # [E*2F, D]: every expert's gate/up rows
    down_weight: torch.Tensor | None  # [D, E*F]: every expert's down projection side by side


def _without_duck_shapes(compiled):
    """`compiled`, traced with a symbol of its own for every dynamic size. Duck shaping (torch's default) gives
    sizes equal at the first trace one symbol: a batch of 32 rows would share the head dim's, be pinned to 32
    where the head dim meets a constant, and the first row to finish would compile the step again."""

    def run(*args):
        saved, fx_config.use_duck_shape = fx_config.use_duck_shape, False
        try:
            return compiled(*args)
        finally:
            fx_config.use_duck_shape = saved

    return run


class DecodeStep:
    def __init__(self, model: ZayaForCausalLM, compile: bool = False) -> None:
        self.model = model
        # Dynamic shapes: the batch shrinks as rows finish and the keys grow every step, which static shapes would
        # recompile for. What varies in Python (weights' version keys, masks) stays outside the compiled region.
        self._compiled = _without_duck_shapes(torch.compile(self._layers, dynamic=True)) if compile else None
        self.invalidate()

    def invalidate(self) -> None:
        """Forgets every rearranged weight; the next step rebuilds them from the model's current parameters."""
        self._key: tuple | None = None
        self._weights: list[_LayerWeights] = []
        # What the rearranged weights are built from, collected here: walking the module tree every step would
        # cost more than the step's GEMMs.
        self._sources = []
        for layer in self.model.model.layers:
            layer.self_attn.qkv_proj.forget_fused_weights()
            self._sources += [*layer.self_attn.qkv_proj.parameters(), layer.self_attn.qk_norm.temp]
            self._sources += layer.mlp.experts.parameters()
            self._sources += [*layer.post_attention_residual_scale.parameters(), *layer.post_mlp_residual_scale.parameters()]

    def layer_weights(self) -> list[_LayerWeights]:
        """The rearranged weights, rebuilt when a tensor they come from has changed in place since the last step."""
        key = tuple((t.data_ptr(), t._version) for t in self._sources)
        if key != self._key:
            dense = self.dense_experts(1)
            self._weights = [self._rearrange(layer, dense) for layer in self.model.model.layers]
            self._key = key
        return self._weights

    @staticmethod
    def _rearrange(layer: ZayaDecoderLayer, dense_experts: bool) -> _LayerWeights:
        cca = layer.self_attn.qkv_proj
        groups, d, taps = cca.num_heads + cca.num_kv_heads, cca.head_dim, cca.num_taps
        proj_weight, proj_bias, conv_CdT, conv_bias_C = cca.fused_weights()
        conv_HId = conv_CdT.view(groups, d, d, taps).permute(0, 3, 2, 1).reshape(groups, taps * d, d)
        temp_G = layer.self_attn.qk_norm.temp.to(torch.float32)
        qk_scale_H1 = torch.cat([temp_G.new_ones(cca.num_heads), temp_G])[:, None] * d**0.5
        experts = layer.mlp.experts
        num_experts, hidden, inter = experts.down_proj.shape
        return _LayerWeights(
            proj_weight=proj_weight,
            proj_bias=proj_bias,
            conv_weight_HId=conv_HId.contiguous(),
            conv_bias_Hd=conv_bias_C.view(groups, d),
            qk_scale_H1=qk_scale_H1,
            attn_merge=layer.post_attention_residual_scale.merge_terms(),
            mlp_merge=layer.post_mlp_residual_scale.merge_terms(),
            gate_up_weight=experts.gate_up_proj.reshape(num_experts * 2 * inter, hidden) if dense_experts else None,
            down_weight=experts.down_proj.permute(1, 0, 2).reshape(hidden, num_experts * inter) if dense_experts else None,
        )

    def dense_experts(self, rows: int) -> bool:
        """Whether a step over `rows` rows runs every expert densely (see DENSE_EXPERT_MACS_PER_EXPERT)."""
        config = self.model.config
        work = (config.num_experts - 1) * rows * config.hidden_size * config.moe_intermediate_size
        return work <= DENSE_EXPERT_MACS_PER_EXPERT * config.num_experts

    @torch.no_grad()
    def __call__(
        self, tokens_B: torch.Tensor, positions_B: torch.Tensor, cache: ZayaCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds one token per row at `positions_B` (each row's position in its own sequence) into `cache`, which
        must hold at least one earlier token; returns the next-token logits [B, V] and the router class of the fed
        token at every layer [B, L]."""
        if cache.get_seq_length() == 0:
            raise ValueError("DecodeStep continues a cache: run the prompt through the model's forward first")
        config = self.model.config
        batch = tokens_B.shape[0]
        past = cache.get_seq_length()
        key_valid_BK = None
        if cache.key_valid is not None:
            key_valid_BK = torch.cat([cache.key_valid, cache.key_valid.new_ones(batch, 1)], dim=1)
        masks = {t: self._key_mask(t, key_valid_BK, past + 1, tokens_B.device) for t in set(config.layer_types)}
        # A lone row runs eager: torch.compile specialises size-1 dims, so it would compile once more for it.
        compiled = self._compiled is not None and batch > 1
        if compiled:  # always a [B, 1, 1, K] mask: a missing or broadcast one would be another graph to compile
            masks = {t: torch.zeros(batch, 1, 1, past + 1, device=tokens_B.device) if m is None
                     else m.expand(batch, -1, -1, -1).contiguous() for t, m in masks.items()}
        # Compiled, the grouped dispatch serves every batch size: one graph fewer, and inductor fuses its ops.
        dense = not compiled and self.dense_experts(batch)
        forward = self._compiled if compiled else self._layers
        logits_BV, expert_ids_BL = forward(tokens_B, positions_B, cache, self.layer_weights(), masks, dense)
        cache.advance(1, key_valid_BK)
        return logits_BV, expert_ids_BL

    def _layers(
        self, tokens_B: torch.Tensor, positions_B: torch.Tensor, cache: ZayaCache, all_weights: list[_LayerWeights],
        masks: dict[str, torch.Tensor | None], dense: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tensor work: embedding, every layer (writing the cache's keys, values and conv/value states)
        and the LM head."""
        model, config = self.model.model, self.model.config
        ropes = {
            t: rope_cos_sin(positions_B[:, None], getattr(model, f"{t}_inv_freq")) for t in set(config.layer_types)
        }
        embeds_BD = model.embed_tokens(tokens_B)
        residual_BD = ((embeds_BD + model.input_hidden_states_bias) * model.input_hidden_states_scale).float()
        router_state_BR = None
        ids_per_layer = []
        for idx, (layer, weights) in enumerate(zip(model.layers, all_weights)):
            layer_type = config.layer_types[idx]
            h_BD = self._attention(layer, weights, residual_BD, ropes[layer_type], masks[layer_type], cache)
            residual_BD = merge_residual(h_BD, residual_BD, *weights.attn_merge)
            x_BD = layer.post_attention_layernorm(residual_BD)
            ids_B, weight_B, router_state_BR, _ = layer.mlp.gate(x_BD, router_state_BR, None)
            if dense:
                h_BD = self._dense_experts(weights, x_BD, ids_B, weight_B, config.num_experts)
            else:
                h_BD = layer.mlp.experts(x_BD, ids_B, weight_B)
            residual_BD = merge_residual(h_BD, residual_BD, *weights.mlp_merge)
            ids_per_layer.append(ids_B)
        logits_BV = self.model.lm_head(model.norm(residual_BD))
        return logits_BV, torch.stack(ids_per_layer, dim=1)

    def _key_mask(
        self, layer_type: str, key_valid_BK: torch.Tensor | None, keys: int, device: torch.device
    ) -> torch.Tensor | None:
        """Additive mask [B, 1, 1, K] (0 or -inf) for the new token's query, or None when it sees every key."""
        config = self.model.config
        window = config.sliding_window if layer_type == "hybrid_sliding" else None
        if key_valid_BK is None and (window is None or window >= keys):
            return None
        visible_BK = key_valid_BK if key_valid_BK is not None else torch.ones(1, keys, dtype=torch.bool, device=device)
        if window is not None and window < keys:
            visible_BK = visible_BK.clone()
            visible_BK[:, : keys - window] = False
        mask_BK = torch.zeros(visible_BK.shape, dtype=torch.float32, device=visible_BK.device)
        return mask_BK.masked_fill_(~visible_BK, float("-inf"))[:, None, None]

    @staticmethod
    def _attention(
        layer: ZayaDecoderLayer,
        weights: _LayerWeights,
        residual_BD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_B11K: torch.Tensor | None,
        cache: ZayaCache,
    ) -> torch.Tensor:
        attn, cca = layer.self_attn, layer.self_attn.qkv_proj
        batch = residual_BD.shape[0]
        heads, kv_heads, d = cca.num_heads, cca.num_kv_heads, cca.head_dim
        groups, group = heads + kv_heads, heads // kv_heads
        x_BD = layer.input_layernorm(residual_BD)
        qk_dim = groups * d
        v_dim = cca.v_proj_current.out_features
        qk_BC, v_cur_BV, v_del_BV = linear(x_BD, weights.proj_weight, weights.proj_bias).split(
            [qk_dim, v_dim, v_dim], dim=-1
        )

        # Composed convolution over the conv state and this token: [H, B, T*d] @ [H, T*d, d].
        window_BTC = torch.cat([cache.conv_state[cca.layer_idx], qk_BC[:, None]], dim=1)
        # States stay contiguous, as the prefill leaves them: a compiled step guards on their strides.
        cache.conv_state[cca.layer_idx] = window_BTC[:, 1:].contiguous()
        taps = window_BTC.shape[1]
        window_HBI = window_BTC.view(batch, taps, groups, d).permute(2, 0, 1, 3).reshape(groups, batch, taps * d)
        conv_BHd = torch.baddbmm(weights.conv_bias_Hd[:, None], window_HBI, weights.conv_weight_HId).transpose(0, 1)

        # Mean skips: each query head averages with its KV head; each KV head takes its group's mean.
        q_pre_BGgd = qk_BC[:, : heads * d].float().view(batch, kv_heads, group, d)
        k_pre_BG1d = qk_BC[:, heads * d :].float().view(batch, kv_heads, 1, d)
        q_res_BGgd = 0.5 * (q_pre_BGgd + k_pre_BG1d)
        skip_BHd = torch.cat([q_res_BGgd.reshape(batch, heads, d), q_res_BGgd.mean(dim=2)], dim=1)
        qk_BHd = conv_BHd.float() + skip_BHd

        eps = torch.finfo(torch.float32).eps
        qk_BHd = qk_BHd * (weights.qk_scale_H1 / qk_BHd.norm(dim=-1, keepdim=True).clamp_min(eps))
        qk_BHd = partial_rope(qk_BHd, *rope).to(x_BD.dtype)
        q_BGgd = qk_BHd[:, :heads].view(batch, kv_heads, group, d)
        k_BG1d = qk_BHd[:, heads:, None]

        prev_BV = cache.value_state[cca.layer_idx]
        cache.value_state[cca.layer_idx] = v_del_BV.contiguous()
        v_BG1d = torch.cat([v_cur_BV, prev_BV], dim=-1).view(batch, kv_heads, 1, d)
        keys_BGKd, values_BGKd = cache.update_kv(cca.layer_idx, k_BG1d, v_BG1d)

        scores_BGgK = torch.matmul(q_BGgd, keys_BGKd.transpose(-1, -2)) * d**-0.5
        if mask_B11K is not None:
            scores_BGgK = scores_BGgK + mask_B11K.to(scores_BGgK.dtype)
        out_BGgd = torch.matmul(scores_BGgK.softmax(dim=-1), values_BGKd)
        return attn.o_proj(out_BGgd.reshape(batch, heads * d))

    @staticmethod
    def _dense_experts(
        weights: _LayerWeights, x_BD: torch.Tensor, ids_B: torch.Tensor, weight_B: torch.Tensor, num_experts: int
    ) -> torch.Tensor:
        """Every expert on every row, the non-chosen ones (and all of a skip-class row) weighted zero."""
        batch = x_BD.shape[0]
        gate_up_BEf = linear(x_BD, weights.gate_up_weight).view(batch, num_experts, -1)
        gate_BEF, up_BEF = gate_up_BEf.chunk(2, dim=-1)
        chosen_BX = torch.zeros(batch, num_experts + 1, dtype=x_BD.dtype, device=x_BD.device)
        chosen_BX.scatter_(1, ids_B[:, None], weight_B[:, None].to(x_BD.dtype))
        act_BEF = F.silu(gate_BEF) * up_BEF * chosen_BX[:, :num_experts, None]
        return linear(act_BEF.reshape(batch, -1), weights.down_weight)

