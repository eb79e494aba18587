"""ZAYA1 for causal LM: the training-grade counterpart of `transformers.ZayaForCausalLM`, with the same parameter
names and shapes and the same logits, plus packed rows, grouped expert dispatch, router replay, per-layer expert
load counts, a decode cache and activation checkpointing.

    from zaya_train.model import ZayaForCausalLM, preset
    model = ZayaForCausalLM(preset("nano"))
    out = model(input_ids, attention_mask=None, position_ids=None)      # out.logits [B, S, vocab]
    out = model(input_ids, document_ids=doc_ids)                         # packed documents
    out = model(input_ids, return_expert_ids=True)                       # out.expert_ids [B, S, L]
    out = model(input_ids, expert_ids=out.expert_ids)                    # replay that routing

Shape suffixes: B batch, S sequence, D hidden, L layers, X router classes (experts + skip), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zaya_train.kernels.dispatch import check_mode
from zaya_train.model.cache import ZayaCache
from zaya_train.model.cca import ZayaAttention, ZayaQKNorm
from zaya_train.model.config import ZayaConfig
from zaya_train.model.layers import ZayaResidualScaling, ZayaRMSNorm, rope_cos_sin, rope_inv_freq
from zaya_train.model.layout import SequenceLayout, build_layout
from zaya_train.model.loss import IGNORE_INDEX, ZayaLMHead
from zaya_train.model.moe import ZayaExperts, ZayaSparseMoeBlock
from zaya_train.model.router import ZayaRouter


@dataclass
class ZayaOutput:
    # None when a training forward asked for the loss only (return_logits=False).
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: ZayaCache | None = None
    # expert_ids_BSL[b, s, l]: class chosen at layer l (num_experts = skip); with return_expert_ids=True.
    expert_ids: torch.Tensor | None = None
    # router_ids_BSL: the class each router picks itself, which a replay (`expert_ids=`) may have overridden;
    # equal to expert_ids without replay. With return_expert_ids=True.
    router_ids: torch.Tensor | None = None
    # tokens_per_expert_LX[l, x]: real (non-padding) tokens routed to class x at layer l, for the balancer.
    tokens_per_expert: torch.Tensor | None = None
    # logprobs_BS[b, t] = log p(labels[b, t + 1] | input_ids[b, : t + 1]) under softmax(logits / temperature),
    # fp32, differentiable; 0 (no gradient) at t = S - 1 and where labels[b, t + 1] is -100. With return_logprobs.
    logprobs: torch.Tensor | None = None


class ZayaDecoderLayer(nn.Module):
    """One ZAYA1 block: CCA then MoE, each pre-normed and merged by learned residual scaling (fp32 stream)."""

    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ZayaAttention(config, layer_idx)
        self.mlp = ZayaSparseMoeBlock(config, layer_idx)
        self.input_layernorm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_residual_scale = ZayaResidualScaling(config.hidden_size)
        self.post_mlp_residual_scale = ZayaResidualScaling(config.hidden_size)

    def forward(
        self,
        residual_BSD: torch.Tensor,
        router_state_BSR: torch.Tensor | None,
        layout: SequenceLayout,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: ZayaCache | None,
        replay_ids_BS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h_BSD = self.self_attn(self.input_layernorm(residual_BSD), layout, rope, cache)
        # The merge into the residual stream and the MoE's pre-norm as one op (one kernel on the Triton path).
        residual_BSD, x_BSD = self.post_attention_residual_scale(
            h_BSD, residual_BSD, norm=self.post_attention_layernorm
        )
        h_BSD, ids_BS, router_state_BSR, own_ids_BS = self.mlp(x_BSD, router_state_BSR, replay_ids_BS)
        return self.post_mlp_residual_scale(h_BSD, residual_BSD), router_state_BSR, ids_BS, own_ids_BS


class ZayaModel(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ZayaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZayaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.gradient_checkpointing = config.gradient_checkpointing
        for layer_type in sorted(set(config.layer_types)):
            self.register_buffer(f"{layer_type}_inv_freq", self.rope_inv_freq(layer_type), persistent=False)

    def rope_inv_freq(self, layer_type: str) -> torch.Tensor:
        theta = self.config.rope_parameters[layer_type]["rope_theta"]
        return rope_inv_freq(theta, self.config.rotary_dim(layer_type))

    def materialize_rope(self, device: torch.device | str) -> None:
        """Recomputes the (non-persistent) RoPE tables, e.g. after weights were assigned to a meta-built model."""
        for layer_type in sorted(set(self.config.layer_types)):
            setattr(self, f"{layer_type}_inv_freq", self.rope_inv_freq(layer_type).to(device))

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        layout: SequenceLayout,
        cache: ZayaCache | None,
        expert_ids_BSL: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the final-normed hidden states [B, S, D], the router class ids [L, B, S] and the classes the
        routers picked themselves [L, B, S] (different only where `expert_ids_BSL` replayed another)."""
        config = self.config
        ropes = {
            layer_type: rope_cos_sin(layout.position_ids_BS, getattr(self, f"{layer_type}_inv_freq"))
            for layer_type in set(config.layer_types)
        }
        embeds_BSD = self.embed_tokens(input_ids_BS)
        residual_BSD = ((embeds_BSD + self.input_hidden_states_bias) * self.input_hidden_states_scale).float()
        router_state_BSR = None
        ids_per_layer, own_per_layer = [], []
        for idx, layer in enumerate(self.layers):
            replay_BS = expert_ids_BSL[..., idx] if expert_ids_BSL is not None else None
            args = (residual_BSD, router_state_BSR, layout, ropes[config.layer_types[idx]], cache, replay_BS)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                residual_BSD, router_state_BSR, ids_BS, own_ids_BS = checkpoint(layer, *args, use_reentrant=False)
            else:
                residual_BSD, router_state_BSR, ids_BS, own_ids_BS = layer(*args)
            ids_per_layer.append(ids_BS)
            own_per_layer.append(own_ids_BS)
        return self.norm(residual_BSD), torch.stack(ids_per_layer), torch.stack(own_per_layer)


class ZayaForCausalLM(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ZayaModel(config)
        self.lm_head = ZayaLMHead(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_kernels(config.kernels)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def set_kernels(self, mode: str) -> None:
        """Routes RMSNorm (+ residual scaling), the CCA q/k path, the MoE experts and the fused LM-head loss
        through `mode`: "auto", "triton" or "torch" (zaya_train.kernels.dispatch, which logs the path each op
        takes at its first call). Recorded in the config, which trainer checkpoints carry."""
        check_mode(mode, "ZayaConfig.kernels")
        self.config.kernels = mode
        for module in self.modules():
            if isinstance(module, (ZayaRMSNorm, ZayaLMHead, ZayaExperts, ZayaAttention)):
                module.kernels = mode

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: normal(0, initializer_range) for matrices, convs and embeddings; zero biases;
        unit norms and scales; `temp` = config.temp_init; balancing biases 0 with the skip class at -1. A tied
        LM head is the embedding, drawn once with its padding row zeroed."""
        std = self.config.initializer_range
        tied_head = self.lm_head if self.config.tie_word_embeddings else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                if module is not tied_head:
                    nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, ZayaExperts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
            elif isinstance(module, ZayaQKNorm):
                module.temp.fill_(self.config.temp_init)
            elif isinstance(module, ZayaRouter):
                module.balancing_biases.zero_()
                module.balancing_biases[-1] = -1.0
                if module.use_eda:
                    module.router_states_scale.fill_(1.0)
            elif isinstance(module, (ZayaRMSNorm,)):
                module.weight.fill_(1.0)
            elif isinstance(module, ZayaResidualScaling):
                module.hidden_states_scale.fill_(1.0)
                module.residual_scale.fill_(1.0)
                module.hidden_states_bias.zero_()
                module.residual_bias.zero_()
        self.model.input_hidden_states_scale.fill_(1.0)
        self.model.input_hidden_states_bias.zero_()

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def routers(self) -> list[ZayaRouter]:
        return [layer.mlp.gate for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: ZayaCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None,
        return_expert_ids: bool = False,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        return_logprobs: bool = False,
        logprob_temperature: float = 1.0,
    ) -> ZayaOutput:
        """`labels` are the input ids (shifted inside, -100 ignored), as in HF. `expert_ids` [B, S, L] replays
        the given class per token and layer. `logits_to_keep=k` computes logits for the last k positions only.
        `return_logits=False` with `labels` computes the loss by the fused chunked LM head + cross-entropy
        (zaya_train.model.loss) and never materialises the logits: the training path. Adding
        `return_logprobs=True` returns, instead of the loss (None), the per-token log-probabilities of the shifted
        labels under softmax(logits / logprob_temperature) by the same chunked head (`token_logprobs`, any
        per-token upstream gradient): out.logprobs [B, S] with logprobs[:, t] = log p(labels[:, t + 1] |
        input_ids[:, : t + 1]), the logits row t's log_softmax at labels[:, t + 1]; 0, with no gradient, at the
        last position and wherever labels[:, t + 1] is -100."""
        config = self.config
        if return_logprobs and (labels is None or return_logits):
            raise ValueError("return_logprobs=True needs labels and return_logits=False")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        if use_cache and cache is None:
            cache = ZayaCache(config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if expert_ids is not None:
            expected = (batch, seq_len, config.num_hidden_layers)
            if tuple(expert_ids.shape) != expected:
                raise ValueError(f"expert_ids has shape {tuple(expert_ids.shape)}, expected {expected}")
            if expert_ids.min() < 0 or expert_ids.max() > config.num_experts:
                raise ValueError(f"expert_ids must lie in [0, {config.num_experts}] (num_experts = skip)")
        layout, key_valid = build_layout(
            config, batch, seq_len, input_ids.device, attention_mask, position_ids, document_ids, cu_seqlens,
            past_len, cache.key_valid if cache is not None else None,
        )
        hidden_BSD, ids_LBS, own_ids_LBS = self.model(input_ids, layout, cache, expert_ids)
        if cache is not None:
            cache.advance(seq_len, key_valid)

        counted_LBS = ids_LBS if layout.token_mask_BS is None else ids_LBS[:, layout.token_mask_BS]
        offsets_L1 = torch.arange(config.num_hidden_layers, device=ids_LBS.device)[:, None] * config.num_router_classes
        tokens_per_expert = torch.bincount(
            (counted_LBS.reshape(config.num_hidden_layers, -1) + offsets_L1).flatten(),
            minlength=config.num_hidden_layers * config.num_router_classes,
        ).view(config.num_hidden_layers, config.num_router_classes)

        logits_BSV, loss, logprobs_BS = None, None, None
        if labels is not None and not return_logits:
            labels = labels.to(hidden_BSD.device)
            shifted_BS = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1)
            if return_logprobs:
                logprobs_BS = self.lm_head(
                    hidden_BSD, labels=shifted_BS, return_logprobs=True, temperature=logprob_temperature
                )
            else:
                loss = self.lm_head(hidden_BSD, labels=shifted_BS)
        else:
            if logits_to_keep:
                hidden_BSD = hidden_BSD[:, -logits_to_keep:]
            logits_BSV = self.lm_head(hidden_BSD)
            if labels is not None:
                loss = F.cross_entropy(
                    logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits_BSV.device),
                    ignore_index=IGNORE_INDEX,
                )
        return ZayaOutput(
            logits=logits_BSV,
            loss=loss,
            cache=cache,
            expert_ids=ids_LBS.permute(1, 2, 0) if return_expert_ids else None,
            router_ids=own_ids_LBS.permute(1, 2, 0) if return_expert_ids else None,
            tokens_per_expert=tokens_per_expert,
            logprobs=logprobs_BS,
        )
