"""Parameter accounting on the meta device: no weight is allocated, so `zaya1_8b` counts in milliseconds.

    python -c "from zaya_train.model import parameter_counts, preset; print(parameter_counts(preset('zaya1_8b')))"
"""

from __future__ import annotations

import torch

from zaya_train.model.config import ZayaConfig


def parameter_counts(config: ZayaConfig) -> dict[str, int]:
    """Parameter counts of a config.

    - `total`: every parameter, the (tied) embedding counted once.
    - `embedding`: the token embedding (plus an untied LM head if the config has one).
    - `total_non_embedding`: `total` - `embedding` (the papers' "8.3B total").
    - `active`: parameters one token uses, without embeddings (the papers' "760M active"): everything but the
      experts, plus `num_experts_per_tok` experts per layer.
    - `active_with_embedding`: `active` + `embedding`.
    - `expert`: the parameters of one expert of one layer.
    """
    from zaya_train.model.model import ZayaForCausalLM

    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()
    all_experts = sum(p.numel() for layer in model.model.layers for p in layer.mlp.experts.parameters())
    one_expert = all_experts // (config.num_hidden_layers * config.num_experts)
    active = total - embedding - all_experts + config.num_hidden_layers * config.num_experts_per_tok * one_expert
    return {
        "total": total,
        "embedding": embedding,
        "total_non_embedding": total - embedding,
        "active": active,
        "active_with_embedding": active + embedding,
        "expert": one_expert,
    }
