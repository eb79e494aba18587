"""Reinforcement learning with Markovian RSA co-design.

    zaya-train recipe=warmstart model.init_from=runs/nano/base run_dir=runs/nano/ws     # aggregation warm start
    zaya-train recipe=rl model.init_from=runs/nano/ws rl.codesign.share=0.5             # co-design RL

    from zaya_train.rl import algorithms as rl
    advantages_NG = rl.group_advantages(rewards_NG, "maxrl")
    out = rl.policy_loss(logp_BT, logp_old_BT, advantages_NG.flatten(), mask_BT)   # DPPO binary-TV
    loss = rl.aggregate(out.loss_BT, mask_BT, "dr_grpo")

- `algorithms`: the ZAYA1 objective as pure PyTorch functions (no model, engine or I/O).
- `config`: the `rl.*` keys. `prompts`: problem i of `rl.data` and its verifier.
- `rollouts`: one step's plain samples and online aggregation rounds, scored and grouped.
- `loop`: `recipe=rl`, the trainer's RL batch source. `warmstart`: `recipe=warmstart`.

Tests: `pytest tests/rl`.
"""

from zaya_train.rl.algorithms import (
    ADVANTAGE_KINDS,
    AGGREGATION_KINDS,
    TRUST_REGIONS,
    DynamicSampling,
    PolicyLoss,
    aggregate,
    chunk_compression_ratios,
    degenerate_mask,
    dynamic_sampling_filter,
    group_advantages,
    is_degenerate,
    k3_kl,
    length_bonus,
    length_bonus_coef,
    policy_loss,
)

__all__ = [
    "ADVANTAGE_KINDS",
    "AGGREGATION_KINDS",
    "TRUST_REGIONS",
    "DynamicSampling",
    "PolicyLoss",
    "aggregate",
    "chunk_compression_ratios",
    "degenerate_mask",
    "dynamic_sampling_filter",
    "group_advantages",
    "is_degenerate",
    "k3_kl",
    "length_bonus",
    "length_bonus_coef",
    "policy_loss",
]
