"""The ZAYA1 reasoning-RL objective as small pure-PyTorch functions: no model, no engine, no I/O.

The ZAYA1-8B technical report (arXiv 2605.05365, section IV) trains its reasoning stages with one shared
spine, built here piece by piece:

- `degenerate_mask`: an LZ77 (zlib) compressibility canary. A rollout that has fallen into a repetition
  loop has its reward zeroed before anything else sees it.
- `dynamic_sampling_filter`: drops groups whose task rewards are all 0 or all 1 (DAPO's dynamic
  sampling); such groups carry no learning signal.
- `length_bonus` (with `length_bonus_coef`): a difficulty-scaled bonus for short correct answers.
- `group_advantages`: MaxRL, (r - mean) / mean; also GRPO, RLOO and plain mean-centring.
- `policy_loss`: per-token policy-gradient loss. The trust region is DPPO binary-TV masking
  ("Rethinking the Trust Region in LLM RL", arXiv 2602.04879) or PPO ratio clipping. An optional
  truncated importance-sampling weight corrects for the rollout engine's log-probs.
- `aggregate`: Dr. GRPO (sum within a rollout, mean over rollouts), token mean or sequence mean.
- `k3_kl`: the k3 per-token KL estimator to a reference policy. ZAYA1 uses no KL term; this is optional.

One training step, with N groups of G rollouts each (B = N * G rollouts of up to T response tokens):

    from zaya_train.rl import algorithms as rl

    degenerate_B = rl.degenerate_mask(response_ids)            # list of B token-id lists
    rewards_NG = rewards_NG.masked_fill(degenerate_B.view(N, G), 0.0)
    kept = rl.dynamic_sampling_filter(rewards_NG)               # kept.keep_N, kept.num_kept, ...
    rewards_NG, lengths_NG = rewards_NG[kept.keep_N], lengths_NG[kept.keep_N]
    bonus_NG = rl.length_bonus(rewards_NG, lengths_NG, l_max=81_920, p_star=p_star_N,
                               coef=rl.length_bonus_coef(step))
    advantages_NG = rl.group_advantages(rewards_NG, "maxrl", length_bonus=bonus_NG)
    out = rl.policy_loss(logp_BT, logp_old_BT, advantages_NG.flatten(), mask_BT,
                         logp_rollout_BT=engine_logp_BT)       # DPPO binary-TV, delta = 0.1
    loss = rl.aggregate(out.loss_BT, mask_BT, "dr_grpo", max_len=81_920)
    loss.backward()   # log out.masked_frac, out.tis_truncated_frac, out.ratio_capped_frac

Here `logp_BT` comes from the current forward pass, with gradients. `logp_old_BT` is the trainer's own
recompute for this batch before its first update. `engine_logp_BT` is what the rollout engine reported
while it sampled.

Shape suffixes:
    N  groups (prompts) in a batch
    G  rollouts per group (the group size, 16 in the report)
    B  rollouts in a batch, one per row (B = N * G once the groups are flattened)
    T  response tokens per row, padded; `mask_BT` is True on real response tokens
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

ADVANTAGE_KINDS = ("maxrl", "grpo", "rloo", "plain")
AGGREGATION_KINDS = ("dr_grpo", "token_mean", "sequence_mean")
TRUST_REGIONS = ("dppo_tv", "ppo_clip", "none")

# LZ77 canary. The window, level and threshold follow the ZAYA1 report. The chunk size and the token byte
# width are our choices; see `chunk_compression_ratios`.
CANARY_WBITS = -10  # raw deflate (no zlib header), 2**10 = 1024-byte window
CANARY_LEVEL = 1
CANARY_THRESHOLD = 0.05
CANARY_CHUNK_TOKENS = 512
TOKEN_ID_BYTES = 4  # each token id is written as a little-endian uint32


# ----------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------


def _float(x: Tensor | Sequence[float]) -> Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float32)


def group_advantages(
    rewards: Tensor,
    kind: str = "maxrl",
    length_bonus: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Advantages of the rollouts of one group, `rewards_G`, or of many, `rewards_NG`.

    The group is always the last dimension. Each rollout i in a group of G gets:

        maxrl:  A_i = (r_i + b_i - mean(r)) / mean(r)          MaxRL, as in the ZAYA1-8B report
        grpo:   A_i = (r_i + b_i - mean(r)) / (std(r) + eps)   GRPO, DeepSeekMath (arXiv 2402.03300);
                                                               ZAYA1 uses it for behavioural RL
        rloo:   A_i = r_i + b_i - mean_{j != i}(r_j)           RLOO (arXiv 2402.14740)
        plain:  A_i = r_i + b_i - mean(r)                      Dr. GRPO's advantage (arXiv 2503.20783)

    `b` is the optional `length_bonus` (same shape as `rewards`, zero when None). It enters each rollout's
    own reward, in the numerator only. Every baseline and scale (the mean, the std, the leave-one-out
    mean, MaxRL's denominator) comes from the raw task rewards. This is how the ZAYA1 report adds its
    length reward to MaxRL: a bonus cannot change the problem's estimated solve rate. A consequence is that
    with a bonus the advantages of a group no longer sum to zero.

    - maxrl: the rewards must be non-negative (MaxRL divides by the mean solve rate). A group whose mean is
      <= `eps` (in practice, all rewards 0) has no successful rollout to learn from, so its advantages
      are defined as 0. That includes the bonus (which needs a correct rollout anyway). Dynamic sampling
      removes such groups before this point.
    - grpo: std is the Bessel-corrected sample std (`torch.std`, correction 1), the usual choice in
      GRPO implementations. `eps` is added to the std, not to the variance. A group of equal rewards then
      gets 0 (numerator 0), not NaN. Needs G >= 2.
    - rloo: equals G / (G - 1) * (r_i - mean(r)) without a bonus. Needs G >= 2.
    """
    rewards = _float(rewards)
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards need a non-empty group dimension (last), got shape {tuple(rewards.shape)}")
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; expected one of {ADVANTAGE_KINDS}")
    group = rewards.shape[-1]
    if kind in ("grpo", "rloo") and group < 2:
        raise ValueError(f"{kind} needs at least 2 rollouts per group, got {group}")
    own = rewards
    if length_bonus is not None:
        length_bonus = torch.as_tensor(length_bonus, dtype=rewards.dtype, device=rewards.device)
        if length_bonus.shape != rewards.shape:
            raise ValueError(
                f"length_bonus shape {tuple(length_bonus.shape)} != rewards {tuple(rewards.shape)}"
            )
        own = rewards + length_bonus
    mean = rewards.mean(dim=-1, keepdim=True)
    if kind == "maxrl":
        if bool((rewards < 0).any()):
            raise ValueError("maxrl needs non-negative rewards: it divides by the group's mean reward")
        has_success = mean > eps
        return torch.where(has_success, (own - mean) / torch.where(has_success, mean, 1.0), 0.0)
    if kind == "grpo":
        return (own - mean) / (rewards.std(dim=-1, keepdim=True) + eps)
    if kind == "rloo":
        others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group - 1)
        return own - others_mean
    return own - mean


class DynamicSampling(NamedTuple):
    """Which groups `dynamic_sampling_filter` keeps, and the counts to log."""

    keep_N: Tensor  # bool
    num_groups: int
    num_kept: int
    num_all_zero: int
    num_all_one: int


def dynamic_sampling_filter(rewards_NG: Tensor) -> DynamicSampling:
    """Keep the groups whose task rewards are neither all 0 nor all 1 (DAPO's dynamic sampling).

    A group in which every rollout failed, or every rollout succeeded, gives MaxRL no usable signal: its
    mean is 0 (undefined advantage) or its numerator is 0. The ZAYA1 report drops such groups, so every
    kept group has a solve rate strictly between 0 and 1. Pass the task rewards after the canary has
    zeroed degenerate rollouts and before any length bonus. The comparison is exact: the rewards are the
    binary verifier outputs 0.0 and 1.0. A group of other equal values (say all 0.5) is kept; its
    advantages are 0 anyway.
    """
    rewards_NG = _float(rewards_NG)
    if rewards_NG.dim() < 1 or rewards_NG.shape[-1] == 0:
        raise ValueError(
            f"rewards need a non-empty group dimension (last), got shape {tuple(rewards_NG.shape)}"
        )
    all_zero_N = (rewards_NG == 0).all(dim=-1)
    all_one_N = (rewards_NG == 1).all(dim=-1)
    keep_N = ~(all_zero_N | all_one_N)
    return DynamicSampling(
        keep_N=keep_N,
        num_groups=keep_N.numel(),
        num_kept=int(keep_N.sum()),
        num_all_zero=int(all_zero_N.sum()),
        num_all_one=int(all_one_N.sum()),
    )


# ----------------------------------------------------------------------------------------------------
# Length reward
# ----------------------------------------------------------------------------------------------------

LENGTH_TOL_FRACTION = 0.05  # T_l = 0.05 * l_max: not from the paper
ACCURACY_TOL = 0.1  # T_acc: not from the paper
LENGTH_COEF_START = 0.1  # c at the first RL step: not from the paper
LENGTH_COEF_RAMP_STEPS = 632  # 232 warmup + 400 curriculum steps: c = 1 from stage 3 on; not from the paper


def length_bonus(
    rewards_NG: Tensor,
    lengths_NG: Tensor,
    *,
    l_max: float,
    p_star: float | Tensor,
    coef: float = 1.0,
    l_tol: float | None = None,
    acc_tol: float = ACCURACY_TOL,
) -> Tensor:
    """Difficulty-scaled length bonus `bonus_NG` for binary rewards (ZAYA1's ALP + ShortRL hybrid).

    In each group, p is the solve rate and l_min the length of the shortest correct rollout:

        lam_i   = 1/2 - clamp((l_i - l_min) / (l_max - l_min), 0, 1)
        lam_i   = 1/2                  if l_i <= l_min + T_l
        m_i     = 1[p > p_star - T_acc] * 1[p > 1/G] * 1[r_i = 1]
        bonus_i = c * p * m_i * lam_i

    So only correct rollouts get a bonus, and only in groups with at least 2 correct rollouts that are
    about as well solved as the best this data source has reached (`p_star`). The bonus is larger on easy
    problems (factor p). It runs from +p/2 (about as short as the shortest correct) down to -p/2 (at
    `l_max` or longer). Feed the result to `group_advantages(..., length_bonus=...)`.

    Args:
        rewards_NG: task rewards in {0, 1} (after the canary). "Correct" means exactly 1.
        lengths_NG: response lengths in tokens.
        l_max: the length at which the bonus reaches -p/2. The report gives no value. Our choice: pass the
            maximum response length of the run (81,920 tokens in the report's stage 3), so the scale
            covers every length a rollout can have. Not from the paper. l_max - l_min is floored at 1.
        p_star: running maximum solve rate of each group's data source: a float, or a tensor `p_star_N`.
            The caller keeps it, e.g. as the max over steps of the source's batch solve rate.
        coef: c. The report ramps it from small in the warmup stage to 1.0 in stage 3; see
            `length_bonus_coef`.
        l_tol: T_l, in tokens. The report gives no value. Default 0.05 * l_max (about 4K tokens at
            81,920), so a few thousand tokens of slack around the shortest correct answer earn the
            full bonus. Not from the paper.
        acc_tol: T_acc. The report gives no value. Default 0.1, about 1.6 rollouts of a G = 16 group and
            below the binomial noise of one group's solve rate (std 0.125 at p = 1/2). A group within that
            of the source's best is treated as solved as well as the best. Not from the paper.
    """
    rewards_NG = _float(rewards_NG)
    lengths_NG = torch.as_tensor(lengths_NG, device=rewards_NG.device).to(rewards_NG.dtype)
    if lengths_NG.shape != rewards_NG.shape:
        raise ValueError(f"lengths shape {tuple(lengths_NG.shape)} != rewards {tuple(rewards_NG.shape)}")
    if l_tol is None:
        l_tol = LENGTH_TOL_FRACTION * l_max
    correct_NG = rewards_NG == 1
    num_correct_N1 = correct_NG.sum(dim=-1, keepdim=True)
    p_N1 = num_correct_N1.to(rewards_NG.dtype) / rewards_NG.shape[-1]
    # shortest correct length; groups without a correct rollout get 0 here, and no bonus below
    l_min_N1 = torch.where(correct_NG, lengths_NG, math.inf).amin(dim=-1, keepdim=True)
    l_min_N1 = torch.where(num_correct_N1 > 0, l_min_N1, 0.0)
    span_N1 = (l_max - l_min_N1).clamp_min(1.0)
    lam_NG = 0.5 - ((lengths_NG - l_min_N1) / span_N1).clamp(0.0, 1.0)
    lam_NG = torch.where(lengths_NG <= l_min_N1 + l_tol, 0.5, lam_NG)
    p_star_N1 = torch.as_tensor(p_star, dtype=rewards_NG.dtype, device=rewards_NG.device)
    if p_star_N1.dim() > 0:
        p_star_N1 = p_star_N1.unsqueeze(-1)
    # p > 1/G is "at least 2 correct", compared on the count rather than on rounded floats
    gate_NG = (p_N1 > p_star_N1 - acc_tol) & (num_correct_N1 > 1) & correct_NG
    return coef * p_N1 * gate_NG.to(rewards_NG.dtype) * lam_NG


def length_bonus_coef(
    step: int,
    *,
    ramp_steps: int = LENGTH_COEF_RAMP_STEPS,
    start: float = LENGTH_COEF_START,
    end: float = 1.0,
) -> float:
    """c for `length_bonus` at RL step `step` (counted from the first reasoning-RL step).

    The ZAYA1 report ramps c from "small" in the warmup stage to 1.0 in stage 3 and gives no schedule. Our
    choice, not from the paper: linear from `start` = 0.1 at step 0 to `end` = 1.0 at `ramp_steps`,
    then constant. The default ramp of 632 steps is the report's warmup (232) plus curriculum (400) step
    counts, so c reaches 1.0 exactly when stage 3 begins.
    """
    if ramp_steps <= 0:
        return end
    return start + (end - start) * min(max(step, 0) / ramp_steps, 1.0)


# ----------------------------------------------------------------------------------------------------
# Per-token policy loss
# ----------------------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    """Per-token loss of `policy_loss` and the token fractions to log (0-dim detached tensors)."""

    loss_BT: Tensor  # 0 on padding and on tokens the trust region removes
    masked_frac: Tensor  # response tokens the trust region removed (DPPO mask, or PPO clip)
    tis_truncated_frac: Tensor  # response tokens whose importance weight hit `tis_cap`
    ratio_capped_frac: Tensor  # response tokens whose ratio pi / pi_old exceeded `ratio_cap`


def policy_loss(
    logp_BT: Tensor,
    logp_old_BT: Tensor,
    advantages: Tensor,
    mask_BT: Tensor,
    *,
    trust_region: str = "dppo_tv",
    delta: float = 0.1,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    logp_rollout_BT: Tensor | None = None,
    tis_cap: float = 2.0,
    ratio_cap: float = 20.0,
) -> PolicyLoss:
    """Per-token policy-gradient loss with a trust region and truncated importance sampling.

    Args:
        logp_BT: log pi(token) under the current policy, with gradients.
        logp_old_BT: log pi_old(token), the trainer's own recompute for this batch before its first
            update. The trust region is measured against it. Used detached.
        advantages: `advantages_B` (one per rollout, broadcast over its tokens) or `advantages_BT`.
        mask_BT: True (or 1) on response tokens. Padding may hold anything, even -inf or NaN: it is
            replaced before any arithmetic, so it reaches neither the loss nor the gradients.
        trust_region: "dppo_tv" (ZAYA1's choice), "ppo_clip" or "none".
        delta: DPPO's binary-TV threshold (0.1 in the ZAYA1 report).
        eps_low, eps_high: PPO's clip range [1 - eps_low, 1 + eps_high] (0.2 / 0.2, the PPO default).
        logp_rollout_BT: log-probs that the rollout engine reported while sampling, or None. When
            given, each token is also weighted by min(pi_old / pi_rollout, tis_cap). This corrects for the
            engine's numerics and its policy lag.
        tis_cap: C, the truncation of that weight. 2.0 is a common choice for truncated importance
            sampling; not from the ZAYA1 report.
        ratio_cap: cap on the weight pi / pi_old, 20 as in DPPO's reference loss.

    With ratio = pi / pi_old, each response token's loss is

        loss = -A * sg(min(ratio, ratio_cap) * w_tis * trusted) * exp(logp - sg(logp))

    where sg is stop-gradient. On trusted tokens its value is -A * min(ratio, ratio_cap) * w_tis, the
    familiar surrogate, and its gradient is that same factor times grad(logp). Elsewhere both are 0.
    This is the gradient of DPPO's reference loss -A * sg(min(ratio, 20)) * logp * trusted. For
    "ppo_clip" (with ratios below `ratio_cap`), it is the gradient of PPO's clipped objective
    max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)).

    A token is "trusted" unless the update would push it further outside the trust region, in the
    direction its advantage pulls:

        dppo_tv:  p = exp(logp), p_old = exp(logp_old), dp = p - p_old (the binary total variation of
                  the sampled token, DPPO arXiv 2602.04879). Removed when A > 0 and dp > delta, or
                  A < 0 and dp < -delta.
        ppo_clip: removed when A > 0 and ratio > 1 + eps_high, or A < 0 and ratio < 1 - eps_low.
                  The comparison is in log space, log(ratio) against log1p(eps). A ratio exactly at a
                  bound is kept, like dp exactly at +-delta.
        none:     nothing is removed.

    Tokens with A = 0 are never counted as removed (their loss is 0 either way).

    The fractions are over response tokens. `masked_frac` is the share the trust region removed.
    `tis_truncated_frac` is the share whose importance weight exceeded `tis_cap` (0 without rollout
    log-probs). `ratio_capped_frac` is the share whose ratio exceeded `ratio_cap`.
    """
    if trust_region not in TRUST_REGIONS:
        raise ValueError(f"unknown trust_region {trust_region!r}; expected one of {TRUST_REGIONS}")
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    mask_BT = mask_BT.bool()
    if logp_BT.shape != mask_BT.shape or logp_old_BT.shape != mask_BT.shape:
        raise ValueError(
            f"logp {tuple(logp_BT.shape)}, logp_old {tuple(logp_old_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must have one shape [B, T]"
        )
    advantages = torch.as_tensor(advantages, dtype=logp_BT.dtype, device=logp_BT.device)
    adv_BT = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand_as(logp_BT)

    # padding -> 0 before exp / subtraction, so -inf or NaN there never turns into NaN values or gradients
    logp_BT = torch.where(mask_BT, logp_BT, 0.0)
    logp_old_BT = torch.where(mask_BT, logp_old_BT.detach(), 0.0)
    logp_now_BT = logp_BT.detach()
    log_ratio_BT = logp_now_BT - logp_old_BT

    pos_BT, neg_BT = adv_BT > 0, adv_BT < 0
    if trust_region == "dppo_tv":
        dp_BT = logp_now_BT.exp() - logp_old_BT.exp()
        outside_BT = (pos_BT & (dp_BT > delta)) | (neg_BT & (dp_BT < -delta))
    elif trust_region == "ppo_clip":
        outside_BT = (pos_BT & (log_ratio_BT > math.log1p(eps_high))) | (
            neg_BT & (log_ratio_BT < math.log1p(-eps_low))
        )
    else:
        outside_BT = torch.zeros_like(mask_BT)
    outside_BT = outside_BT & mask_BT

    ratio_BT = log_ratio_BT.exp()
    weight_BT = ratio_BT.clamp(max=ratio_cap)
    num_tokens = mask_BT.sum().clamp_min(1).to(logp_BT.dtype)
    tis_truncated_frac = logp_BT.new_zeros(())
    if logp_rollout_BT is not None:
        if logp_rollout_BT.shape != mask_BT.shape:
            raise ValueError(
                f"logp_rollout shape {tuple(logp_rollout_BT.shape)} != mask {tuple(mask_BT.shape)}"
            )
        logp_rollout_BT = torch.where(mask_BT, logp_rollout_BT.detach().to(logp_BT.dtype), 0.0)
        is_weight_BT = (logp_old_BT - logp_rollout_BT).exp()
        tis_truncated_frac = ((is_weight_BT > tis_cap) & mask_BT).sum() / num_tokens
        weight_BT = weight_BT * is_weight_BT.clamp(max=tis_cap)
    weight_BT = torch.where(mask_BT & ~outside_BT, weight_BT, 0.0)

    unit_BT = (logp_BT - logp_now_BT).exp()  # value 1, gradient d(logp)
    loss_BT = -adv_BT * weight_BT * unit_BT
    return PolicyLoss(
        loss_BT=loss_BT,
        masked_frac=outside_BT.sum() / num_tokens,
        tis_truncated_frac=tis_truncated_frac,
        ratio_capped_frac=((ratio_BT > ratio_cap) & mask_BT).sum() / num_tokens,
    )


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    kind: str = "dr_grpo",
    *,
    max_len: float | None = None,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses (one rollout per row) to the scalar to back-propagate.

        dr_grpo:       sum_b sum_t m * loss / (max_len * R)   sum within a rollout, mean over rollouts
        token_mean:    sum_b sum_t m * loss / M               every response token weighs the same (DAPO)
        sequence_mean: sum_b (sum_t m * loss / M_b) / R       GRPO's per-rollout mean, then mean

    Here R is the number of rollouts (rows with at least one response token), M the number of response
    tokens and M_b those of row b.

    dr_grpo is the ZAYA1 report's choice. Dr. GRPO ("Understanding R1-Zero-Like Training", arXiv
    2503.20783) removes GRPO's 1/|o_i|, and its code divides the per-rollout sum by a constant, the
    generation budget, in place of the rollout's length. Only the loss scale depends on that constant
    (effectively the learning rate and the gradient-clip threshold), not the gradient direction. Our
    choice: `max_len` is that constant. Pass the run's maximum response length to follow Dr. GRPO.
    With None it is 1, a plain sum over tokens, as the report describes it.

    `denominator` replaces R (dr_grpo, sequence_mean) or M (token_mean). Use it when one optimiser step
    spans several micro-batches or ranks: pass the step's global count, then sum the micro-batch losses.
    """
    if kind not in AGGREGATION_KINDS:
        raise ValueError(f"unknown aggregation {kind!r}; expected one of {AGGREGATION_KINDS}")
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(f"loss shape {tuple(loss_BT.shape)} != mask {tuple(mask_BT.shape)}")
    mask_BT = mask_BT.bool()
    masked_BT = torch.where(mask_BT, loss_BT, 0.0)
    tokens_B = mask_BT.sum(dim=-1)
    num_rollouts = (tokens_B > 0).sum()
    if kind == "token_mean":
        total, count = masked_BT.sum(), mask_BT.sum()
    elif kind == "sequence_mean":
        total, count = (masked_BT.sum(dim=-1) / tokens_B.clamp_min(1)).sum(), num_rollouts
    else:
        total, count = masked_BT.sum() / (1.0 if max_len is None else max_len), num_rollouts
    if denominator is None:
        denominator = count.clamp_min(1).to(loss_BT.dtype)
    return total / denominator


# ----------------------------------------------------------------------------------------------------
# LZ77 compressibility canary
# ----------------------------------------------------------------------------------------------------


def _empty_sync_flush_size() -> int:
    compressor = zlib.compressobj(CANARY_LEVEL, zlib.DEFLATED, CANARY_WBITS)
    return len(compressor.flush(zlib.Z_SYNC_FLUSH))


# What a sync flush adds on its own: an empty stored block, i.e. a 3-bit header padded to a byte, then the
# LEN/NLEN marker 00 00 FF FF (5 bytes).
SYNC_FLUSH_OVERHEAD = _empty_sync_flush_size()


def _rollout_bytes(rollout: str | bytes | Sequence[int] | Tensor) -> bytes:
    if isinstance(rollout, str):
        return rollout.encode("utf-8", errors="surrogatepass")
    if isinstance(rollout, (bytes, bytearray)):
        return bytes(rollout)
    ids = rollout.detach().cpu().numpy() if isinstance(rollout, Tensor) else np.asarray(rollout)
    ids = ids.reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("token ids must lie in [0, 2**32)")
    return ids.astype("<u4").tobytes()


def chunk_compression_ratios(
    rollout: str | bytes | Sequence[int] | Tensor,
    *,
    chunk_tokens: int = CANARY_CHUNK_TOKENS,
) -> list[float]:
    """Per-chunk compressibility (compressed - flush overhead) / raw of one rollout, as in ZAYA1's canary.

    One raw-deflate stream (zlib level 1, wbits -10: a 1024-byte window) runs over the rollout's bytes.
    A `Z_SYNC_FLUSH` ends each chunk, so every chunk's output is known while the window still carries
    over across chunks. The chunks hold `chunk_tokens` tokens. A short last chunk is merged into the one
    before it, so a chunk holds up to 2 * chunk_tokens - 1 tokens. A rollout shorter than one chunk is a
    single chunk; an empty one has no chunks.

    Bytes. Token ids (a list or tensor) are written as little-endian uint32, 4 bytes each. That width
    holds any vocabulary (ZAYA1's has 262,144 ids) and is our choice. Text is UTF-8 and is chunked by
    4 * chunk_tokens bytes: about chunk_tokens tokens of English, at roughly 4 characters per token.

    Chunk size, our choice: 512 tokens = 2048 bytes = 2 windows. A chunk inside a short loop then
    compresses to a few dozen bytes (block and Huffman headers), well under the 0.05 * 2048 = 102 bytes
    the threshold allows. A loop about one chunk long is caught anywhere in an 80K-token rollout.
    Smaller chunks would let those fixed headers alone approach the threshold.

    What it catches, measured at these settings: normal text and token ids give ratios of about 0.3-1.0.
    Loops are caught when their period is up to roughly 10-20 tokens, or about 50 bytes of text: a token
    or phrase repeated over and over. Longer periods stay above 0.05 (0.1-0.4 at 30-190 tokens). Level 1
    follows only a few hash-chain candidates. Also, deflate never reaches back further than the window
    minus its 262-byte lookahead, 762 bytes or 190 tokens here, so a longer loop is invisible to it.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    data = _rollout_bytes(rollout)
    chunk_bytes = chunk_tokens * TOKEN_ID_BYTES
    starts = list(range(0, len(data), chunk_bytes))
    if len(starts) > 1 and len(data) - starts[-1] < chunk_bytes:
        starts.pop()  # the short tail joins the chunk before it
    compressor = zlib.compressobj(CANARY_LEVEL, zlib.DEFLATED, CANARY_WBITS)
    ratios = []
    for i, start in enumerate(starts):
        chunk = data[start : starts[i + 1] if i + 1 < len(starts) else len(data)]
        compressed = len(compressor.compress(chunk)) + len(compressor.flush(zlib.Z_SYNC_FLUSH))
        ratios.append(max(compressed - SYNC_FLUSH_OVERHEAD, 0) / len(chunk))
    return ratios


def is_degenerate(
    rollout: str | bytes | Sequence[int] | Tensor,
    *,
    chunk_tokens: int = CANARY_CHUNK_TOKENS,
    threshold: float = CANARY_THRESHOLD,
) -> bool:
    """True when any chunk of the rollout compresses below `threshold` (0.05, from the ZAYA1 report).

    Such a rollout has fallen into a repetition loop. Its reward is zeroed before advantages are computed.
    See `chunk_compression_ratios` for the stream and the chunking.
    """
    return any(r < threshold for r in chunk_compression_ratios(rollout, chunk_tokens=chunk_tokens))


def degenerate_mask(
    rollouts: Sequence[str | bytes | Sequence[int] | Tensor],
    *,
    chunk_tokens: int = CANARY_CHUNK_TOKENS,
    threshold: float = CANARY_THRESHOLD,
) -> Tensor:
    """`degenerate_B`: `is_degenerate` for each rollout, as a bool tensor (CPU)."""
    flags = [is_degenerate(r, chunk_tokens=chunk_tokens, threshold=threshold) for r in rollouts]
    return torch.tensor(flags, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------
# KL to a reference policy (optional; ZAYA1 uses none)
# ----------------------------------------------------------------------------------------------------


def k3_kl(logp_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), for tokens sampled from pi.

        k3 = pi_ref / pi - log(pi_ref / pi) - 1   (>= 0, and 0 where pi = pi_ref)

    This is the estimator that GRPO (DeepSeekMath, arXiv 2402.03300) adds to its loss. Its expectation
    under pi is exactly KL(pi || pi_ref). Gradients flow through both inputs as given, so detach
    `logp_ref_BT` if it is not already. With `mask_BT`, padding gives 0 and its values (even -inf)
    never reach the result.
    """
    if mask_BT is not None:  # both log-probs 0 on padding -> ratio 1 -> k3 exactly 0 there
        mask_BT = mask_BT.bool()
        logp_BT = torch.where(mask_BT, logp_BT, 0.0)
        logp_ref_BT = torch.where(mask_BT, logp_ref_BT, 0.0)
    log_r_BT = logp_ref_BT - logp_BT
    return log_r_BT.exp() - log_r_BT - 1.0
