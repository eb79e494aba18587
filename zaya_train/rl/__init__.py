"""Reinforcement learning: the ZAYA1 reasoning-RL objective as pure PyTorch functions.

    from zaya_train.rl import algorithms as rl
    advantages_NG = rl.group_advantages(rewards_NG, "maxrl")
    out = rl.policy_loss(logp_BT, logp_old_BT, advantages_NG.flatten(), mask_BT)   # DPPO binary-TV
    loss = rl.aggregate(out.loss_BT, mask_BT, "dr_grpo")

`algorithms` holds no model, engine or I/O; its module docstring walks through one full step. Tests:
`pytest tests/rl`.
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
