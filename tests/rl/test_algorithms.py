"""The RL spine, function by function, against values worked out by hand in comments: `pytest tests/rl`."""

from __future__ import annotations

import math
import random
import string
import zlib

import pytest
import torch

from zaya_train.rl import algorithms as rl

LN2 = math.log(2.0)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ----------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------


def test_maxrl_divides_by_the_group_mean():
    # r = [1, 0, 0, 0]: mean = 1/4
    # correct: (1 - 0.25) / 0.25 = 3;  wrong: (0 - 0.25) / 0.25 = -1
    close(rl.group_advantages(t([1, 0, 0, 0]), "maxrl"), [3.0, -1.0, -1.0, -1.0])
    # r = [1, 1, 1, 0]: mean = 3/4 -> correct (0.25 / 0.75) = 1/3, wrong -0.75 / 0.75 = -1
    close(rl.group_advantages(t([1, 1, 1, 0]), "maxrl"), [1 / 3, 1 / 3, 1 / 3, -1.0])


def test_maxrl_length_bonus_enters_the_numerator_only():
    # r = [1, 1, 0, 0], bonus b = [0.2, -0.1, 0, 0]; the raw task mean is 0.5 in numerator and denominator:
    #   (1 + 0.2 - 0.5) / 0.5 = 1.4;  (1 - 0.1 - 0.5) / 0.5 = 0.8;  (0 - 0.5) / 0.5 = -1
    # (Using the mean of r + b = 0.525 instead would give (1.2 - 0.525) / 0.525 = 1.2857 for the first.)
    adv = rl.group_advantages(t([1, 1, 0, 0]), "maxrl", length_bonus=t([0.2, -0.1, 0, 0]))
    close(adv, [1.4, 0.8, -1.0, -1.0])


def test_maxrl_zero_mean_group_gets_zero_advantages_not_nan():
    # no success: mean 0 -> defined as all-zero advantages, with or without a bonus
    close(rl.group_advantages(t([0, 0, 0]), "maxrl"), [0.0, 0.0, 0.0])
    close(rl.group_advantages(t([0, 0, 0]), "maxrl", length_bonus=t([0.3, 0, 0])), [0.0, 0.0, 0.0])
    # a mean at or below eps counts as zero: [0, 0, 3e-7] has mean 1e-7 <= 1e-6
    close(rl.group_advantages(t([0, 0, 3e-7]), "maxrl"), [0.0, 0.0, 0.0])


def test_maxrl_rejects_negative_rewards():
    with pytest.raises(ValueError, match="non-negative"):
        rl.group_advantages(t([1.0, -1.0]), "maxrl")


def test_grpo_uses_bessel_std_and_eps_on_the_std():
    # r = [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25]
    # sum of squares = 0.5625 + 3 * 0.0625 = 0.75; Bessel variance = 0.75 / 3 = 0.25; std = 0.5
    # -> [0.75 / 0.5, -0.25 / 0.5, ...] = [1.5, -0.5, -0.5, -0.5]
    close(rl.group_advantages(t([1, 0, 0, 0]), "grpo", eps=0.0), [1.5, -0.5, -0.5, -0.5])
    # G = 2, r = [0, 1]: deviations -0.5, 0.5; variance (0.25 + 0.25) / 1 = 0.5; std = 0.70711
    # eps = 0:   +-0.5 / 0.70711 = +-0.70711
    # eps = 0.5: +-0.5 / (0.70711 + 0.5) = +-0.41421   (eps added to the std, not the variance)
    close(rl.group_advantages(t([0, 1]), "grpo", eps=0.0), [-0.70711, 0.70711])
    close(rl.group_advantages(t([0, 1]), "grpo", eps=0.5), [-0.41421, 0.41421])


def test_rloo_subtracts_the_mean_of_the_others():
    # r = [1, 0, 0, 0]: first 1 - mean(0, 0, 0) = 1; others 0 - mean(1, 0, 0) = -1/3
    close(rl.group_advantages(t([1, 0, 0, 0]), "rloo"), [1.0, -1 / 3, -1 / 3, -1 / 3])
    # G = 2, r = [1, 0]: 1 - 0 = 1, 0 - 1 = -1; bonus [0.5, 0] -> 1.5 - 0 = 1.5, 0 - 1 = -1
    close(rl.group_advantages(t([1, 0]), "rloo"), [1.0, -1.0])
    close(rl.group_advantages(t([1, 0]), "rloo", length_bonus=t([0.5, 0])), [1.5, -1.0])


def test_plain_subtracts_the_mean():
    # r = [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; bonus 0.1 on the first -> 0.85
    close(rl.group_advantages(t([1, 0, 0, 0]), "plain"), [0.75, -0.25, -0.25, -0.25])
    close(
        rl.group_advantages(t([1, 0, 0, 0]), "plain", length_bonus=t([0.1, 0, 0, 0])),
        [0.85, -0.25, -0.25, -0.25],
    )


@pytest.mark.parametrize("kind", rl.ADVANTAGE_KINDS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.7])
def test_all_equal_rewards_give_zero_advantages(kind, value):
    adv = rl.group_advantages(t([value] * 5), kind)
    assert torch.isfinite(adv).all()
    close(adv, [0.0] * 5, atol=1e-6, rtol=0)


def test_batched_groups_match_hand_values_and_the_single_group_form():
    rewards_NG = t([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    # maxrl rows: mean 1/4 -> [3, -1, -1, -1]; mean 0 -> zeros; mean 1/2 -> [1, 1, -1, -1]
    close(rl.group_advantages(rewards_NG, "maxrl"), [[3, -1, -1, -1], [0, 0, 0, 0], [1, 1, -1, -1]])
    for kind in rl.ADVANTAGE_KINDS:
        batched = rl.group_advantages(rewards_NG, kind)
        for n in range(3):
            close(batched[n], rl.group_advantages(rewards_NG[n], kind))


def test_advantage_argument_checks():
    # integer and bool rewards are accepted as floats
    close(rl.group_advantages(torch.tensor([True, False]), "plain"), [0.5, -0.5])
    with pytest.raises(ValueError, match="unknown advantage kind"):
        rl.group_advantages(t([1, 0]), "ppo")
    with pytest.raises(ValueError, match="at least 2"):
        rl.group_advantages(t([1.0]), "rloo")
    with pytest.raises(ValueError, match="at least 2"):
        rl.group_advantages(t([1.0]), "grpo")
    with pytest.raises(ValueError, match="shape"):
        rl.group_advantages(t([1, 0]), "maxrl", length_bonus=t([0.1, 0, 0]))


# ----------------------------------------------------------------------------------------------------
# dynamic_sampling_filter
# ----------------------------------------------------------------------------------------------------


def test_dynamic_sampling_drops_all_zero_and_all_one_groups():
    rewards_NG = t(
        [
            [0, 0, 0, 0],  # all 0: dropped
            [1, 1, 1, 1],  # all 1: dropped
            [1, 0, 0, 0],  # kept
            [0, 1, 1, 1],  # kept
            [0.5, 0.5, 0.5, 0.5],  # neither all 0 nor all 1: kept
        ]
    )
    kept = rl.dynamic_sampling_filter(rewards_NG)
    assert kept.keep_N.tolist() == [False, False, True, True, True]
    assert (kept.num_groups, kept.num_kept, kept.num_all_zero, kept.num_all_one) == (5, 3, 1, 1)


def test_dynamic_sampling_with_groups_of_two():
    kept = rl.dynamic_sampling_filter(torch.tensor([[0, 0], [1, 1], [0, 1], [1, 0]]))
    assert kept.keep_N.tolist() == [False, False, True, True]
    assert (kept.num_kept, kept.num_all_zero, kept.num_all_one) == (2, 1, 1)


# ----------------------------------------------------------------------------------------------------
# length_bonus
# ----------------------------------------------------------------------------------------------------


def test_length_bonus_hand_values():
    # G = 4, r = [1, 1, 1, 0], lengths [100, 280, 1000, 50], l_max = 1000, p_star = 0.5, T_acc = 0.1
    # p = 3/4; 3 correct > 1; p = 0.75 > 0.5 - 0.1 -> gate open for the three correct rollouts
    # l_min = 100 (the wrong 50-token rollout does not count); l_max - l_min = 900
    # lam = 1/2 - clamp((l - 100) / 900, 0, 1): 0.5 - 0 = 0.5;  0.5 - 180/900 = 0.3;  0.5 - 1 = -0.5
    # bonus = c * p * lam = 0.75 * [0.5, 0.3, -0.5, 0] = [0.375, 0.225, -0.375, 0]
    rewards, lengths = t([1, 1, 1, 0]), t([100, 280, 1000, 50])
    # default T_l = 0.05 * 1000 = 50: 280 > 100 + 50, so nothing changes
    close(rl.length_bonus(rewards, lengths, l_max=1000, p_star=0.5), [0.375, 0.225, -0.375, 0.0])
    # T_l = 200: 280 <= 300 -> lam = 1/2 -> 0.75 * 0.5 = 0.375; 1000 > 300 stays -0.375
    close(rl.length_bonus(rewards, lengths, l_max=1000, p_star=0.5, l_tol=200), [0.375, 0.375, -0.375, 0.0])
    # c = 0.5 halves everything
    close(rl.length_bonus(rewards, lengths, l_max=1000, p_star=0.5, coef=0.5), [0.1875, 0.1125, -0.1875, 0.0])
    # a correct rollout longer than l_max is clamped to lam = -1/2: 0.75 * -0.5 = -0.375
    long = rl.length_bonus(rewards, t([100, 280, 5000, 50]), l_max=1000, p_star=0.5)
    close(long, [0.375, 0.225, -0.375, 0.0])


def test_length_bonus_gates():
    lengths = t([100, 550, 1000, 10])
    # exactly one correct rollout: p = 1/4 is not > 1/G -> no bonus at all
    close(rl.length_bonus(t([1, 0, 0, 0]), lengths, l_max=1000, p_star=0.0), [0.0] * 4)
    # r = [1, 1, 0, 0]: p = 0.5, l_min = 100, span 900, lam = [0.5, 0.5 - 450/900 = 0, ...]
    # p_star = 0.55, T_acc = 0.1: 0.5 > 0.45 -> open: 0.5 * [0.5, 0.0] = [0.25, 0]
    close(rl.length_bonus(t([1, 1, 0, 0]), lengths, l_max=1000, p_star=0.55), [0.25, 0.0, 0.0, 0.0])
    # p_star = 0.75, T_acc = 0.25: 0.5 > 0.5 is false (strict) -> closed
    closed = rl.length_bonus(t([1, 1, 0, 0]), lengths, l_max=1000, p_star=0.75, acc_tol=0.25)
    close(closed, [0.0] * 4)
    # no correct rollout: zeros, no inf from the empty minimum
    close(rl.length_bonus(t([0, 0, 0, 0]), lengths, l_max=1000, p_star=0.0), [0.0] * 4)


def test_length_bonus_batched_with_a_p_star_per_group():
    rewards_NG = t([[1, 1, 0, 0], [1, 1, 0, 0]])
    lengths_NG = t([[100, 550, 1, 1], [100, 550, 1, 1]])
    # both groups: p = 0.5, lam = [0.5, 0] -> [0.25, 0]; group 0 has p_star 0.55 (open), group 1 0.9 (closed)
    bonus = rl.length_bonus(rewards_NG, lengths_NG, l_max=1000, p_star=t([0.55, 0.9]))
    close(bonus, [[0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_length_bonus_feeds_maxrl():
    # bonus from the hand example: [0.375, 0.225, -0.375, 0]; r = [1, 1, 1, 0], raw mean 0.75
    # A = [(1.375 - 0.75), (1.225 - 0.75), (0.625 - 0.75), (0 - 0.75)] / 0.75
    #   = [0.83333, 0.63333, -0.16667, -1]
    rewards = t([1, 1, 1, 0])
    bonus = rl.length_bonus(rewards, t([100, 280, 1000, 50]), l_max=1000, p_star=0.5)
    close(rl.group_advantages(rewards, "maxrl", length_bonus=bonus), [0.83333, 0.63333, -0.16667, -1.0])


def test_length_bonus_coef_schedule():
    # linear from 0.1 at step 0 to 1.0 at step 632: halfway (316) is 0.1 + 0.9 * 0.5 = 0.55
    assert rl.length_bonus_coef(0) == pytest.approx(0.1)
    assert rl.length_bonus_coef(316) == pytest.approx(0.55)
    assert rl.length_bonus_coef(632) == pytest.approx(1.0)
    assert rl.length_bonus_coef(5000) == pytest.approx(1.0)
    assert rl.length_bonus_coef(-3) == pytest.approx(0.1)
    assert rl.length_bonus_coef(5, ramp_steps=10, start=0.0, end=2.0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# policy_loss
# ----------------------------------------------------------------------------------------------------


def _logp(probs):
    return torch.log(t(probs))


def test_dppo_binary_tv_masks_only_moves_beyond_delta_in_the_advantage_direction():
    # B = 2, T = 3; row 0 has 2 response tokens and one padding position, which holds -inf and NaN
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    p_old = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    p_new = [[0.625, 0.75, 0.5], [0.375, 0.25, 0.625]]
    logp = _logp(p_new)
    logp[0, 2] = -math.inf
    logp.requires_grad_(True)
    logp_old = _logp(p_old)
    logp_old[0, 2] = math.nan
    adv_B = t([1.0, -2.0])
    out = rl.policy_loss(logp, logp_old, adv_B, mask, trust_region="dppo_tv", delta=0.125)
    # dp = p - p_old:  row 0 (A = +1): +0.125 (= delta: kept), +0.25 (> delta: masked)
    #                  row 1 (A = -2): -0.125 (= -delta: kept), -0.25 (< -delta: masked), +0.125 (kept:
    #                  moving up is against the pull of A < 0, so not "further")
    # loss = -A * ratio on kept tokens; ratio = p / p_old:
    #   row 0 token 0: -1 * 0.625/0.5 = -1.25
    #   row 1 token 0: -(-2) * 0.375/0.5 = 1.5;  token 2: 2 * 0.625/0.5 = 2.5
    expected = [[-1.25, 0.0, 0.0], [1.5, 0.0, 2.5]]
    close(out.loss_BT, expected)
    # 2 of the 5 response tokens were removed
    close(out.masked_frac, 0.4)
    close(out.tis_truncated_frac, 0.0)
    close(out.ratio_capped_frac, 0.0)
    # d loss / d logp = -A * ratio on kept tokens (the same numbers), 0 on masked tokens and padding
    out.loss_BT.sum().backward()
    close(logp.grad, expected)


def test_dppo_gradient_matches_the_reference_form():
    # DPPO's reference: -A * sg(min(ratio, 20)) * logp * valid, valid = (A > 0 ? dp <= d : dp >= -d)
    gen = torch.Generator().manual_seed(1)
    logp_old = torch.log(torch.rand(4, 6, generator=gen) * 0.98 + 0.01)
    logp = (logp_old + 0.4 * torch.randn(4, 6, generator=gen)).clamp(max=-1e-3).requires_grad_(True)
    adv = torch.randn(4, generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    rl.policy_loss(logp, logp_old, adv, mask, delta=0.1).loss_BT.sum().backward()
    ours = logp.grad.clone()
    logp.grad = None
    a = adv[:, None].expand(4, 6)
    dp = logp.detach().exp() - logp_old.exp()
    valid = torch.where(a > 0, dp <= 0.1, dp >= -0.1).float()
    ratio_sg = (logp.detach() - logp_old).exp().clamp(max=20.0)
    (-a * ratio_sg * logp * valid).sum().backward()
    close(ours, logp.grad)


def test_ppo_clip_at_the_boundary_is_kept_and_beyond_is_removed():
    # logp_old = 0, so log ratio = logp. Bounds: log(1 + 0.2) and log(1 - 0.2).
    up, down = math.log1p(0.2), math.log1p(-0.2)
    logp = t([[up, up + 1e-3, down, down - 1e-3, up + 1e-3]]).requires_grad_(True)
    adv_BT = t([[1.0, 1.0, -1.0, -1.0, -1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = rl.policy_loss(
        logp, torch.zeros(1, 5), adv_BT, mask, trust_region="ppo_clip", eps_low=0.2, eps_high=0.2
    )
    # token 0: A > 0, ratio exactly 1.2 -> kept: -1 * 1.2 = -1.2
    # token 1: A > 0, ratio above 1.2 -> clipped: 0
    # token 2: A < 0, ratio exactly 0.8 -> kept: +1 * 0.8 = 0.8
    # token 3: A < 0, ratio below 0.8 -> clipped: 0
    # token 4: A < 0, ratio above 1.2 -> kept (PPO clips a negative advantage only from below):
    #          exp(log 1.2 + 0.001) = 1.2 * 1.0010005 = 1.2012006
    close(out.loss_BT, [[-1.2, 0.0, 0.8, 0.0, 1.2012006]])
    close(out.masked_frac, 2 / 5)
    out.loss_BT.sum().backward()
    close(logp.grad, [[-1.2, 0.0, 0.8, 0.0, 1.2012006]])


def test_ppo_clip_gradient_matches_the_clipped_objective():
    # the textbook loss max(-A * r, -A * clip(r, 1 - el, 1 + eh)) with r = exp(logp - logp_old)
    gen = torch.Generator().manual_seed(2)
    logp_old = -torch.rand(3, 8, generator=gen) * 3
    logp = (logp_old + 0.3 * torch.randn(3, 8, generator=gen)).requires_grad_(True)
    adv = torch.randn(3, 8, generator=gen)
    mask = torch.ones(3, 8, dtype=torch.bool)
    out = rl.policy_loss(logp, logp_old, adv, mask, trust_region="ppo_clip", eps_low=0.2, eps_high=0.28)
    out.loss_BT.sum().backward()
    ours = logp.grad.clone()
    logp.grad = None
    r = (logp - logp_old).exp()
    torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28)).sum().backward()
    close(ours, logp.grad)
    assert 0 < out.masked_frac < 1  # the random draw does exercise clipping


def test_truncated_importance_weight_against_the_rollout_logprobs():
    # ratio pi / pi_old = 1 everywhere; w = min(pi_old / pi_rollout, C = 2):
    #   p_old 0.5 over p_rollout [0.5, 0.25, 0.125] -> [1, 2, 4] -> [1, 2 (= C, not truncated), 2]
    # loss = -A * w with A = 1 -> [-1, -2, -2]; 1 of 3 tokens truncated
    logp = _logp([[0.5, 0.5, 0.5]]).requires_grad_(True)
    out = rl.policy_loss(
        logp,
        _logp([[0.5, 0.5, 0.5]]),
        t([1.0]),
        torch.ones(1, 3, dtype=torch.bool),
        trust_region="none",
        logp_rollout_BT=_logp([[0.5, 0.25, 0.125]]),
        tis_cap=2.0,
    )
    close(out.loss_BT, [[-1.0, -2.0, -2.0]])
    close(out.tis_truncated_frac, 1 / 3)
    out.loss_BT.sum().backward()
    close(logp.grad, [[-1.0, -2.0, -2.0]])


def test_tis_weight_multiplies_the_dppo_ratio():
    # p_old 0.5, p 0.625 (ratio 1.25, dp 0.125 <= delta 0.125), p_rollout 0.25 (w = 2, C = 3), A = -1
    # loss = -(-1) * 1.25 * 2 = 2.5
    out = rl.policy_loss(
        _logp([[0.625]]),
        _logp([[0.5]]),
        t([-1.0]),
        torch.ones(1, 1, dtype=torch.bool),
        delta=0.125,
        logp_rollout_BT=_logp([[0.25]]),
        tis_cap=3.0,
    )
    close(out.loss_BT, [[2.5]])
    close(out.tis_truncated_frac, 0.0)


def test_ratio_cap_bounds_the_weight():
    # p_old = 1/64, p = 1/2: ratio 32 > 20 -> weight 20; loss = -1 * 20 = -20 (trust region off)
    logp = _logp([[0.5, 0.5]]).requires_grad_(True)
    out = rl.policy_loss(
        logp, _logp([[1 / 64, 0.5]]), t([1.0]), torch.ones(1, 2, dtype=torch.bool), trust_region="none"
    )
    close(out.loss_BT, [[-20.0, -1.0]])
    close(out.ratio_capped_frac, 0.5)
    out.loss_BT.sum().backward()
    close(logp.grad, [[-20.0, -1.0]])


def test_per_token_advantages_equal_broadcast_and_zero_advantage_is_never_masked():
    mask = torch.ones(2, 2, dtype=torch.bool)
    logp, logp_old = _logp([[0.75, 0.5], [0.25, 0.5]]), _logp([[0.5, 0.5], [0.5, 0.5]])
    a = rl.policy_loss(logp, logp_old, t([1.0, 0.0]), mask, delta=0.125)
    b = rl.policy_loss(logp, logp_old, t([[1.0, 1.0], [0.0, 0.0]]), mask, delta=0.125)
    close(a.loss_BT, b.loss_BT)
    # row 0: dp 0.25 > 0.125 with A > 0 -> masked; row 1 has A = 0: dp = -0.25 is not counted
    # masked 1 of 4 tokens; loss: [[0, -1 * 1.0], [0, 0]]
    close(a.masked_frac, 0.25)
    close(a.loss_BT, [[0.0, -1.0], [0.0, 0.0]])


def test_policy_loss_argument_checks():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="trust_region"):
        rl.policy_loss(x, x, t([1.0]), m, trust_region="clip")
    with pytest.raises(ValueError, match="eps_low"):
        rl.policy_loss(x, x, t([1.0]), m, trust_region="ppo_clip", eps_low=1.0)
    with pytest.raises(ValueError, match="shape"):
        rl.policy_loss(x, torch.zeros(1, 3), t([1.0]), m)


# ----------------------------------------------------------------------------------------------------
# aggregate
# ----------------------------------------------------------------------------------------------------


def _agg_inputs():
    # row 0: 2 tokens (1, 2) then padding (NaN); row 1: 3 tokens (3, 4, 5); row 2: all padding
    loss = t([[1.0, 2.0, math.nan], [3.0, 4.0, 5.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    return loss, mask


def test_aggregate_hand_values():
    loss, mask = _agg_inputs()
    # token_mean: (1 + 2 + 3 + 4 + 5) / 5 = 3
    close(rl.aggregate(loss, mask, "token_mean"), 3.0)
    # sequence_mean: rows with tokens: mean(1, 2) = 1.5, mean(3, 4, 5) = 4 -> (1.5 + 4) / 2 = 2.75
    close(rl.aggregate(loss, mask, "sequence_mean"), 2.75)
    # dr_grpo: sums 3 and 12 over 2 rollouts -> 7.5; with max_len = 4: 15 / (4 * 2) = 1.875
    close(rl.aggregate(loss, mask, "dr_grpo"), 7.5)
    close(rl.aggregate(loss, mask, "dr_grpo", max_len=4), 1.875)


def test_aggregate_with_a_global_denominator():
    loss, mask = _agg_inputs()
    # denominator 10 replaces the count: token_mean 15 / 10; dr_grpo 15 / 10; sequence_mean 5.5 / 10
    close(rl.aggregate(loss, mask, "token_mean", denominator=10), 1.5)
    close(rl.aggregate(loss, mask, "dr_grpo", denominator=10), 1.5)
    close(rl.aggregate(loss, mask, "sequence_mean", denominator=10), 0.55)


def test_aggregate_gradients_weight_tokens_as_documented():
    loss, mask = _agg_inputs()
    loss = torch.nan_to_num(loss).requires_grad_(True)
    # dr_grpo: every response token weighs 1 / R = 1/2; sequence_mean: 1 / (R * M_b) = 1/4 and 1/6
    rl.aggregate(loss, mask, "dr_grpo").backward()
    close(loss.grad, [[0.5, 0.5, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    loss.grad = None
    rl.aggregate(loss, mask, "sequence_mean").backward()
    close(loss.grad, [[0.25, 0.25, 0.0], [1 / 6, 1 / 6, 1 / 6], [0.0, 0.0, 0.0]])


def test_aggregate_of_all_padding_is_zero():
    for kind in rl.AGGREGATION_KINDS:
        close(rl.aggregate(torch.ones(2, 3), torch.zeros(2, 3), kind), 0.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        rl.aggregate(torch.ones(1, 1), torch.ones(1, 1), "mean")


# ----------------------------------------------------------------------------------------------------
# LZ77 canary
# ----------------------------------------------------------------------------------------------------

NORMAL_TEXT = (
    "To find the number of lattice points inside the circle, first note that the radius squared is 50. "
    "For each integer x between -7 and 7 we count the integers y with x^2 + y^2 < 50. When x = 0 the bound "
    "is y^2 < 50, so y ranges over -7..7, which gives fifteen values. For x = 1 the bound becomes y^2 < 49, "
    "leaving -6..6 and thirteen values; x = 3 gives y^2 < 41 and again thirteen. Summing the symmetric "
    "contributions and doubling the non-zero columns yields 145, but we must double-check the boundary "
    "cases where the inequality is tight, since the problem asks for strictly interior points. Checking "
    "x = 5, y = 5 gives exactly 50, which is excluded. Hence the final answer is \\boxed{145}."
)


def _random_ids(n, seed=0, vocab=262_144):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_sync_flush_overhead_is_an_empty_stored_block():
    # 3-bit stored-block header padded to one byte (0x00), then LEN = 0x0000 and NLEN = 0xFFFF: 5 bytes
    compressor = zlib.compressobj(1, zlib.DEFLATED, -10)
    assert compressor.flush(zlib.Z_SYNC_FLUSH) == b"\x00\x00\x00\xff\xff"
    assert rl.SYNC_FLUSH_OVERHEAD == 5


def test_single_chunk_ratio_is_compressed_minus_overhead_over_raw():
    data = NORMAL_TEXT.encode()
    compressor = zlib.compressobj(1, zlib.DEFLATED, -10)
    compressed = len(compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))
    ratios = rl.chunk_compression_ratios(NORMAL_TEXT)  # 700-odd bytes < 2048: one chunk
    assert ratios == [pytest.approx((compressed - 5) / len(data))]


def test_repeated_text_is_degenerate_and_normal_text_is_not():
    loop = "The answer is 42. " * 500  # 9000 bytes, period 18
    assert rl.is_degenerate(loop)
    assert max(rl.chunk_compression_ratios(loop)) < 0.05
    assert not rl.is_degenerate(NORMAL_TEXT)
    assert rl.chunk_compression_ratios(NORMAL_TEXT)[0] > 0.3
    assert not rl.is_degenerate("Hi.")  # tiny rollouts cost more than they save


def test_token_id_rollouts():
    normal = _random_ids(3000)
    assert not rl.is_degenerate(normal)
    assert min(rl.chunk_compression_ratios(normal)) > 0.5
    assert rl.is_degenerate([11, 22, 33] * 2000)
    # a tensor of ids is read like the list
    assert rl.chunk_compression_ratios(torch.tensor(normal)) == rl.chunk_compression_ratios(normal)
    with pytest.raises(ValueError, match="token ids"):
        rl.is_degenerate([1, -2, 3])


def test_a_loop_at_the_end_of_a_long_rollout_is_caught_by_chunking():
    # 2048 normal tokens then a 4-token loop for 1200 tokens
    rollout = _random_ids(2048) + [5, 6, 7, 8] * 300
    ratios = rl.chunk_compression_ratios(rollout)
    # 3248 tokens / 512: chunks at 0, 512, ..., 3072; the last one (176 tokens) merges: 6 chunks
    assert len(ratios) == 6
    assert min(ratios[:4]) > 0.5 and max(ratios[4:]) < 0.05
    assert rl.is_degenerate(rollout)
    # as one single chunk the rollout as a whole is not compressible enough to trip the threshold
    assert not rl.is_degenerate(rollout, chunk_tokens=100_000)


def test_the_window_is_1024_bytes():
    # a 1500-byte loop is further back than a 1024-byte window reaches, so deflate finds nothing to copy
    # and every chunk stays near the ratio of random letters (about 0.73); a 32 KiB window would find it
    rng = random.Random(0)
    period = "".join(rng.choice(string.ascii_letters) for _ in range(1500))
    ratios = rl.chunk_compression_ratios(period * 6)
    assert len(ratios) == 4 and min(ratios) > 0.5
    assert not rl.is_degenerate(period * 6)


@pytest.mark.parametrize(
    ("num_tokens", "num_chunks"), [(0, 0), (10, 1), (512, 1), (1023, 1), (1024, 2), (1300, 2), (1536, 3)]
)
def test_short_last_chunk_merges(num_tokens, num_chunks):
    # 1300 = 512 + 788 (the 276-token tail joins the second chunk); 1536 = 3 * 512
    assert len(rl.chunk_compression_ratios(_random_ids(num_tokens))) == num_chunks


def test_degenerate_mask():
    mask = rl.degenerate_mask([NORMAL_TEXT, "ab" * 3000, _random_ids(600), [7] * 600])
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------------------------------
# k3_kl
# ----------------------------------------------------------------------------------------------------


def test_k3_hand_values():
    # k3 = r - log r - 1 with r = pi_ref / pi
    #   pi 0.5,  ref 0.25: r = 0.5 -> 0.5 + ln 2 - 1 = 0.193147
    #   pi 0.25, ref 0.5:  r = 2   -> 2 - ln 2 - 1   = 0.306853
    #   equal:             r = 1   -> 0
    logp = _logp([[0.5, 0.25, 0.3]]).requires_grad_(True)
    kl = rl.k3_kl(logp, _logp([[0.25, 0.5, 0.3]]))
    close(kl, [[0.5 + LN2 - 1, 1 - LN2, 0.0]])
    # d k3 / d logp = 1 - r: [0.5, -1, 0]
    kl.sum().backward()
    close(logp.grad, [[0.5, -1.0, 0.0]])


def test_k3_expectation_is_the_exact_kl():
    # pi = [0.5, 0.25, 0.25], ref = [0.25, 0.25, 0.5]
    # KL(pi || ref) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2 = 0.173287
    # sum pi * k3 = 0.5 * 0.193147 + 0 + 0.25 * 0.306853 = 0.173287
    pi, ref = t([0.5, 0.25, 0.25]), t([0.25, 0.25, 0.5])
    expectation = (pi * rl.k3_kl(pi.log()[None], ref.log()[None])[0]).sum()
    close(expectation, 0.25 * LN2)


def test_k3_masks_padding():
    logp = t([[math.log(0.5), -math.inf]]).requires_grad_(True)
    kl = rl.k3_kl(logp, t([[math.log(0.25), math.nan]]), torch.tensor([[1, 0]]))
    close(kl, [[0.5 + LN2 - 1, 0.0]])
    kl.sum().backward()
    close(logp.grad, [[0.5, 0.0]])
