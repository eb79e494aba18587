"""Aggregation prompts from an arbitrary population, the prompt-length bound and RL trajectory records, on a tiny
vocabulary where every prompt can be written out by hand: `pytest tests/rsa/test_population.py`."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from zaya_train.rollout import RolloutResult
from zaya_train.rsa import (
    RSAConfig,
    RSAProblem,
    TextAggregationTemplate,
    Trajectory,
    aggregation_prompts,
    max_aggregation_prompt_len,
    population_prompts,
    run_rsa,
)

# One token per template piece: intro 1, question, before-candidates 2, header 3/4/5 + tail per candidate, outro 6.
TEMPLATE = TextAggregationTemplate(
    intro_ids=(1,),
    before_candidates_ids=(2,),
    candidate_header_ids=((3,), (4,), (5,)),
    outro_ids=(6,),
)
END, EOS, MARKER, BOS = 7, 8, 9, 0
PROBLEM = RSAProblem(problem_id="p", prompt_ids=[BOS, 50, 51], question_ids=[50, 51])
POPULATION = [
    [20, 21, 22, 23],  # longer than tau: cut, marker in front
    [30, 31],  # within tau: carried whole, no marker
    [40, 41, 42, EOS],  # EOS stripped before the cut
    [60, 61, 62, END, 63],  # finished: "markovian" carries the reasoning before END, not the answer
]
TAILS = {0: [MARKER, 22, 23], 1: [30, 31], 2: [MARKER, 41, 42], 3: [MARKER, 61, 62]}


def config(c: int, n: int = 4, **kwargs) -> RSAConfig:
    defaults = {
        "beta": 8,
        "tau": 2,
        "truncation_marker_ids": [MARKER],
        "strip_ids": [EOS],
        "reasoning_end_ids": [END],
    }
    return RSAConfig(n=n, c=c, **{**defaults, **kwargs})


def expected_prompt(parents: tuple[int, ...], tails: dict[int, list[int]] = TAILS) -> list[int]:
    out = [1, 50, 51, 2]
    for header, j in zip((3, 4, 5), parents):
        out += [header, *tails[j]]
    return out + [6]


def parents_of(prompts) -> list[tuple[int, ...]]:
    return [p.parents for p in prompts]


def test_prompts_hold_the_chosen_tails_in_order_inside_the_template():
    prompts = population_prompts(PROBLEM, POPULATION, 1, 6, config(c=3), TEMPLATE, seed=3)
    assert len(prompts) == 6
    for prompt_ids, parents in prompts:
        assert prompt_ids == expected_prompt(parents)
    # Spelled out for the first prompt, whatever its subset: 1 + question + 2 + three (header, tail) + 6.
    a, b, c = prompts[0].parents
    assert prompts[0].prompt_ids == [1, 50, 51, 2, 3, *TAILS[a], 4, *TAILS[b], 5, *TAILS[c], 6]


def test_bos_ids_lead_every_prompt():
    plain = population_prompts(PROBLEM, POPULATION, 1, 4, config(c=2), TEMPLATE, seed=3)
    with_bos = population_prompts(PROBLEM, POPULATION, 1, 4, config(c=2), TEMPLATE, seed=3, bos_ids=[BOS])
    assert [p.prompt_ids for p in with_bos] == [[BOS, *p.prompt_ids] for p in plain]
    assert parents_of(with_bos) == parents_of(plain)


def test_changing_the_population_changes_the_prompts_that_show_the_change():
    cfg = config(c=2)
    before = population_prompts(PROBLEM, POPULATION, 1, 8, cfg, TEMPLATE, seed=3)
    changed = [POPULATION[0], [33, 34, 35], *POPULATION[2:]]
    after = population_prompts(PROBLEM, changed, 1, 8, cfg, TEMPLATE, seed=3)
    assert parents_of(after) == parents_of(before)  # subsets never depend on what the candidates say
    shows_1 = [i for i, p in enumerate(before) if 1 in p.parents]
    assert shows_1 and len(shows_1) < 8  # both kinds occur, so the test below is not vacuous
    for i, (old, new) in enumerate(zip(before, after)):
        assert new.prompt_ids == expected_prompt(new.parents, {**TAILS, 1: [MARKER, 34, 35]})
        assert (new.prompt_ids != old.prompt_ids) == (i in shows_1)


def test_the_seed_argument_alone_picks_the_subsets():
    def subsets(seed: int, cfg_seed: int = 0) -> list[tuple[int, ...]]:
        population = [[100 + j] for j in range(8)]
        return parents_of(
            population_prompts(
                PROBLEM, population, 1, 16, config(c=3, n=8, seed=cfg_seed), TEMPLATE, seed=seed
            )
        )

    assert subsets(1) == subsets(1)
    assert subsets(1) != subsets(2)  # an RL loop passes a new seed every step and gets new subsets
    assert subsets(1, cfg_seed=5) == subsets(1)  # config.seed is not read: the seed argument replaces it
    # run_rsa's prompts are the seed=config.seed case.
    cfg = config(c=2, seed=11)
    assert aggregation_prompts(PROBLEM, POPULATION, 2, cfg, TEMPLATE) == population_prompts(
        PROBLEM, POPULATION, 2, 4, cfg, TEMPLATE, seed=11
    )


def test_c1_continues_candidate_i_wrapping_when_k_exceeds_n():
    cfg = config(c=1, n=3)
    prompts = population_prompts(PROBLEM, POPULATION[:3], 1, 5, cfg, TEMPLATE, seed=3)
    assert parents_of(prompts) == [(0,), (1,), (2,), (0,), (1,)]
    own = [
        [1, 50, 51, 2, 3, MARKER, 22, 23, 6],
        [1, 50, 51, 2, 3, 30, 31, 6],
        [1, 50, 51, 2, 3, MARKER, 41, 42, 6],
    ]
    assert [p.prompt_ids for p in prompts] == [own[0], own[1], own[2], own[0], own[1]]
    fewer = population_prompts(PROBLEM, POPULATION[:3], 1, 2, cfg, TEMPLATE, seed=3)
    assert [p.prompt_ids for p in fewer] == own[:2]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_k_prompts_from_n_candidates(k):
    prompts = population_prompts(PROBLEM, POPULATION, 1, k, config(c=3), TEMPLATE, seed=3)
    assert len(prompts) == k
    for prompt_ids, parents in prompts:
        assert len(parents) == len(set(parents)) == 3 and set(parents) <= {0, 1, 2, 3}
        assert prompt_ids == expected_prompt(parents)


def test_subsets_are_without_replacement_and_in_range():
    population = [[100 + j] for j in range(6)]
    everyone = population_prompts(PROBLEM, population[:3], 1, 20, config(c=3, n=3), TEMPLATE, seed=3)
    assert all(sorted(p.parents) == [0, 1, 2] for p in everyone)
    some = parents_of(population_prompts(PROBLEM, population, 1, 200, config(c=3, n=6), TEMPLATE, seed=3))
    assert all(len(set(s)) == 3 and set(s) <= set(range(6)) for s in some)
    assert {j for s in some for j in s} == set(range(6))  # no candidate is left out of every draw


def test_length_bound_by_hand_is_tight_for_cut_tails():
    cfg = config(c=2)
    # |question| 2 + overhead (intro 1 + before 1 + 2 headers + outro 1) 5 + C=2 * (tau 2 + |marker| 1) = 13.
    assert max_aggregation_prompt_len(PROBLEM, cfg, TEMPLATE) == 13
    assert max_aggregation_prompt_len(PROBLEM, cfg, TEMPLATE, bos_ids=[BOS]) == 14
    cut = [POPULATION[0], POPULATION[2], POPULATION[3]]  # every tail cut
    prompts = population_prompts(PROBLEM, cut, 1, 6, cfg, TEMPLATE, seed=3, bos_ids=[BOS])
    assert [len(p.prompt_ids) for p in prompts] == [14] * 6
    uncut = [[30, 31], [32, 33], [34]]
    prompts = population_prompts(PROBLEM, uncut, 1, 6, cfg, TEMPLATE, seed=3)
    assert all(len(p.prompt_ids) <= 2 + 5 + 2 * 2 for p in prompts)


@pytest.mark.parametrize("variant", ["markovian", "answer_tails"])
def test_length_bound_holds_however_long_the_candidates(variant):
    cfg = config(c=3, n=6, beta=64, tau=5, variant=variant)
    rng = random.Random(0)

    def text(length: int) -> list[int]:
        return [rng.randrange(10, 99) for _ in range(length)]

    population = [
        text(1),
        text(5),  # exactly tau: not cut
        text(6),
        text(5000),  # unfinished
        [*text(500), END, *text(300)],  # finished with a long answer
        [*text(500), END, *text(2)],  # finished with a short answer
    ]
    bound = max_aggregation_prompt_len(PROBLEM, cfg, TEMPLATE)
    # |question| 2 + overhead (intro, before-candidates, outro and 3 headers: 6) + C=3 * (tau 5 + |marker| 1).
    assert bound == 2 + 6 + 3 * (5 + 1)
    prompts = population_prompts(PROBLEM, population, 1, 200, cfg, TEMPLATE, seed=3)
    assert max(len(p.prompt_ids) for p in prompts) == bound  # reached by a prompt showing three cut tails


def test_full_variant_bound_uses_beta():
    cfg = config(c=2, beta=5, variant="full")
    assert max_aggregation_prompt_len(PROBLEM, cfg, TEMPLATE) == 2 + 5 + 2 * 5
    whole = [[20 + j] * 5 for j in range(4)]  # candidates as long as beta allows
    prompts = population_prompts(PROBLEM, whole, 1, 4, cfg, TEMPLATE, seed=3)
    assert [len(p.prompt_ids) for p in prompts] == [17] * 4


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="round_idx"):
        population_prompts(PROBLEM, POPULATION, 0, 4, config(c=2), TEMPLATE, seed=0)
    with pytest.raises(ValueError, match="k must"):
        population_prompts(PROBLEM, POPULATION, 1, 0, config(c=2), TEMPLATE, seed=0)
    with pytest.raises(ValueError, match="at least config.c=3"):
        population_prompts(PROBLEM, POPULATION[:2], 1, 4, config(c=3), TEMPLATE, seed=0)


@dataclass(frozen=True)
class Scripted:
    token_ids: list[int]


def test_run_rsa_prompts_are_those_of_the_code_before_population_prompts():
    """The prompts below were recorded from run_rsa as it was before it built its prompts through
    `population_prompts` (same scripted generator, config and problems); the refactor must not move a subset."""
    calls = []

    def generate(prompts, budget, seed):
        # Output of round r for candidate i of problem k: [7, x, x], x = 100 * (r + 1) + 10 * k + i.
        r = len(calls)
        calls.append(prompts)
        k_i = [divmod(j, 3) for j in range(len(prompts))]
        return [Scripted([7, 100 * (r + 1) + 10 * k + i, 100 * (r + 1) + 10 * k + i]) for k, i in k_i]

    problems = [
        RSAProblem(problem_id=7, prompt_ids=[0, 50, 51], question_ids=[50, 51]),
        RSAProblem(problem_id="q", prompt_ids=[0, 60, 61], question_ids=[60, 61]),
    ]
    cfg = RSAConfig(n=3, c=2, t=2, beta=4, tau=2, truncation_marker_ids=[9], seed=5)
    run_rsa(problems, generate, lambda problem, ids: (0.0, None), cfg, TEMPLATE)
    assert calls[1:] == [
        [
            [1, 50, 51, 2, 3, 9, 101, 101, 4, 9, 102, 102, 6],
            [1, 50, 51, 2, 3, 9, 101, 101, 4, 9, 102, 102, 6],
            [1, 50, 51, 2, 3, 9, 100, 100, 4, 9, 102, 102, 6],
            [1, 60, 61, 2, 3, 9, 110, 110, 4, 9, 111, 111, 6],
            [1, 60, 61, 2, 3, 9, 110, 110, 4, 9, 112, 112, 6],
            [1, 60, 61, 2, 3, 9, 112, 112, 4, 9, 110, 110, 6],
        ],
        [
            [1, 50, 51, 2, 3, 9, 201, 201, 4, 9, 202, 202, 6],
            [1, 50, 51, 2, 3, 9, 200, 200, 4, 9, 202, 202, 6],
            [1, 50, 51, 2, 3, 9, 202, 202, 4, 9, 200, 200, 6],
            [1, 60, 61, 2, 3, 9, 212, 212, 4, 9, 210, 210, 6],
            [1, 60, 61, 2, 3, 9, 212, 212, 4, 9, 210, 210, 6],
            [1, 60, 61, 2, 3, 9, 211, 211, 4, 9, 212, 212, 6],
        ],
    ]


def engine_result(prompt_len: int, token_ids: list[int], finish_reason: str = "eos") -> RolloutResult:
    """What the rollout engine returns for a prompt of `prompt_len` ids: a routing row per fed and new token."""
    rows = torch.arange(2 * (prompt_len + len(token_ids))).reshape(-1, 2)
    logprobs = [-0.5 * (i + 1) for i in range(len(token_ids))]
    return RolloutResult(token_ids=token_ids, logprobs=logprobs, expert_ids=rows, finish_reason=finish_reason)


def test_trajectory_from_an_engine_result_holds_the_ids_fed_to_the_engine():
    prompt = population_prompts(PROBLEM, POPULATION, 1, 1, config(c=2), TEMPLATE, seed=3, bos_ids=[BOS])[0]
    assert len(prompt.prompt_ids) == 1 + 2 + 5 + len(TAILS[prompt.parents[0]]) + len(TAILS[prompt.parents[1]])
    result = engine_result(len(prompt.prompt_ids), [70, 71, EOS])
    traj = Trajectory.from_rollout("p", 1, prompt.prompt_ids, result, prompt.parents)
    assert (traj.problem_id, traj.round, traj.parents, traj.reward) == ("p", 1, prompt.parents, None)
    assert traj.prompt_ids == prompt.prompt_ids and traj.prompt_ids[0] == BOS
    assert traj.token_ids == [70, 71, EOS] and traj.logprobs == [-0.5, -1.0, -1.5]
    assert traj.expert_ids is result.expert_ids and traj.finish_reason == "eos"
    # The same prompt without the BOS the engine saw no longer lines up with the engine's routing rows.
    with pytest.raises(ValueError, match="BOS"):
        Trajectory.from_rollout("p", 1, prompt.prompt_ids[1:], result, prompt.parents)


def test_trajectory_round_zero_has_no_parents():
    traj = Trajectory.from_rollout("p", 0, PROBLEM.prompt_ids, engine_result(3, [70], "length"))
    assert (traj.round, traj.parents, traj.token_ids, traj.finish_reason) == (0, (), [70], "length")
    with pytest.raises(ValueError, match="parents"):
        Trajectory.from_rollout("p", 0, PROBLEM.prompt_ids, engine_result(3, [70]), (1,))
    with pytest.raises(ValueError, match="parents"):
        Trajectory.from_rollout("p", 1, PROBLEM.prompt_ids, engine_result(3, [70]))


def test_trajectory_rejects_logprobs_that_do_not_match_the_tokens():
    result = RolloutResult(
        token_ids=[70, 71],
        logprobs=[-1.0],
        expert_ids=torch.zeros(5, 2, dtype=torch.long),
        finish_reason="eos",
    )
    with pytest.raises(ValueError, match="1 logprobs for 2 tokens"):
        Trajectory.from_rollout("p", 0, PROBLEM.prompt_ids, result)
