"""Markovian RSA core with a fake generator: `pytest tests/rsa` (offline, about a second)."""

from __future__ import annotations

import json

import pytest

from tests.rsa.fakes import FakeGenerator
from zaya_train.rewards import ExactMatchVerifier
from zaya_train.rsa import (
    Candidate,
    RSAConfig,
    RSAProblem,
    TextAggregationTemplate,
    aggregation_prompts,
    carried_context,
    choose_parents,
    majority_score,
    max_aggregation_prompt_len,
    round_metrics,
    run_rsa,
    verifier_scorer,
    write_results,
)

# Template: intro 3 + before-candidates 2 + 2 per candidate header + outro 4 = 9 + 2*C tokens.
TEMPLATE = TextAggregationTemplate(
    intro_ids=(1, 2, 3),
    before_candidates_ids=(4, 5),
    candidate_header_ids=((6, 7), (6, 8), (6, 9), (6, 10)),
    outro_ids=(11, 12, 13, 14),
)
MARKER = [90, 91]
QUESTION_LEN = 5


def problems(count: int = 3) -> list[RSAProblem]:
    # Round-0 prompt = a BOS-like 0 + the 5 question tokens; aggregation prompts hold the bare question.
    return [
        RSAProblem(
            problem_id=f"p{k}",
            prompt_ids=[0, *range(100 + 10 * k, 105 + 10 * k)],
            question_ids=list(range(100 + 10 * k, 105 + 10 * k)),
            reference=k,
        )
        for k in range(count)
    ]


def parity_score(problem: RSAProblem, token_ids: list[int]) -> tuple[float, str | None]:
    return float(token_ids[-1] % 2 == 0), str(token_ids[-1] % 3)


def run(cfg: RSAConfig, gen: FakeGenerator, count: int = 3):
    return run_rsa(problems(count), gen, parity_score, cfg, TEMPLATE)


def contains(haystack: list[int], needle: list[int]) -> bool:
    k = len(needle)
    return any(haystack[i : i + k] == needle for i in range(len(haystack) - k + 1))


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_markovian_prompts_stay_bounded(t):
    cfg = RSAConfig(n=6, c=3, t=t, beta=20, tau=8, truncation_marker_ids=MARKER)
    result = run(cfg, FakeGenerator(min_len=12, max_len=20))
    bound = QUESTION_LEN + cfg.c * (cfg.tau + len(MARKER)) + TEMPLATE.overhead(cfg.c)
    assert bound == 5 + 3 * 10 + 15 == 50
    assert max_aggregation_prompt_len(problems()[0], cfg, TEMPLATE) == 50
    # Every candidate is longer than tau, so every tail is cut and every aggregation prompt hits the bound.
    assert [r.max_prompt_tokens for r in result.rounds] == [6] + [50] * t
    assert all(c.prompt_tokens == 50 for pop in result.populations[1:] for cands in pop for c in cands)


def test_full_chain_prompts_grow_with_the_whole_candidate():
    cfg = RSAConfig(n=6, c=3, t=2, beta=20, tau=8, variant="full", truncation_marker_ids=MARKER)
    result = run(cfg, FakeGenerator(min_len=20, max_len=20))
    # |question| + C * whole candidate (20) + overhead; no marker since nothing is cut.
    assert [r.max_prompt_tokens for r in result.rounds] == [6, 5 + 3 * 20 + 15, 80]


def test_prompts_hold_exactly_the_round_before_tails():
    cfg = RSAConfig(n=5, c=3, t=3, beta=20, tau=8, truncation_marker_ids=MARKER)
    gen = FakeGenerator(min_len=4, max_len=20)  # some candidates are shorter than tau: left uncut
    result = run(cfg, gen)
    probs = problems()
    assert len(gen.calls) == 4
    for t in range(1, cfg.t + 1):
        prompts = gen.calls[t][0]
        for k, problem in enumerate(probs):
            prev = result.populations[t - 1][k]
            for i, cand in enumerate(result.populations[t][k]):
                assert len(set(cand.parents)) == cfg.c and all(0 <= j < cfg.n for j in cand.parents)
                tails = []
                for j in cand.parents:
                    ids = prev[j].token_ids
                    tails.append(ids if len(ids) <= 8 else [*MARKER, *ids[-8:]])
                expected = [1, 2, 3, *problem.question_ids, 4, 5]
                for h, tail in zip(TEMPLATE.candidate_header_ids, tails):
                    expected += [*h, *tail]
                expected += [11, 12, 13, 14]
                assert prompts[k * cfg.n + i] == expected
                assert cand.prompt_tokens == len(expected)
                if t >= 2:  # nothing from two rounds back leaks in
                    for old in result.populations[t - 2][k]:
                        assert not contains(expected, old.token_ids[-min(8, len(old.token_ids)) :])


def test_budgets_per_round():
    cfg = RSAConfig(n=4, c=2, t=3, beta=20, tau=8, final_beta=30)
    gen = FakeGenerator(min_len=25, max_len=40)
    result = run(cfg, gen)
    assert [call[1] for call in gen.calls] == [20, 20, 20, 30]
    longest = [max(len(c.token_ids) for cands in pop for c in cands) for pop in result.populations]
    assert longest == [20, 20, 20, 30]


def test_c1_continues_each_chain_on_its_own():
    cfg = RSAConfig(n=4, c=1, t=2, beta=20, tau=8, truncation_marker_ids=MARKER)
    gen = FakeGenerator(min_len=12, max_len=20)
    result = run(cfg, gen)
    for t in (1, 2):
        for k, problem in enumerate(problems()):
            for i, cand in enumerate(result.populations[t][k]):
                assert cand.parents == (i,)
                own = result.populations[t - 1][k][i].token_ids
                expected = [1, 2, 3, *problem.question_ids, 4, 5, 6, 7, *MARKER, *own[-8:], 11, 12, 13, 14]
                assert gen.calls[t][0][k * cfg.n + i] == expected
    assert result.rounds[1].max_prompt_tokens == 5 + 10 + 9 + 2


def test_t0_is_plain_parallel_sampling():
    cfg = RSAConfig(n=4, c=2, t=0, beta=20, tau=8, final_beta=99)
    gen = FakeGenerator(min_len=12, max_len=40)
    result = run(cfg, gen, count=2)
    assert len(gen.calls) == 1 and gen.calls[0][1] == 20
    assert gen.calls[0][0] == [[0, 100, 101, 102, 103, 104]] * 4 + [[0, 110, 111, 112, 113, 114]] * 4
    assert len(result.populations) == len(result.rounds) == 1
    assert all(c.parents == () for cands in result.populations[0] for c in cands)
    tokens = [c.token_ids for c in result.populations[0][0]]
    assert len({tuple(t) for t in tokens}) == 4  # the N samples of a problem differ


def test_same_seed_same_population_other_seed_differs():
    def populations(seed):
        cfg = RSAConfig(n=6, c=3, t=2, beta=20, tau=8, seed=seed)
        result = run(cfg, FakeGenerator(min_len=4, max_len=20))
        return [[[(c.token_ids, c.parents) for c in cands] for cands in pop] for pop in result.populations]

    assert populations(3) == populations(3)
    other = populations(4)
    assert other != populations(3)
    assert other[0] != populations(3)[0]


def test_subset_choice_is_a_pure_function():
    first = [choose_parents(7, "p0", 1, i, 16, 4) for i in range(16)]
    assert first == [choose_parents(7, "p0", 1, i, 16, 4) for i in range(16)]
    assert all(len(set(s)) == 4 and all(0 <= j < 16 for j in s) for s in first)
    assert first != [choose_parents(8, "p0", 1, i, 16, 4) for i in range(16)]
    assert first != [choose_parents(7, "p1", 1, i, 16, 4) for i in range(16)]
    assert first != [choose_parents(7, "p0", 2, i, 16, 4) for i in range(16)]
    assert sorted(choose_parents(0, "p", 1, 0, 5, 5)) == [0, 1, 2, 3, 4]


def test_carried_context_variants():
    end, eos = [77, 78], 2
    finished = [10, 11, 12, 13, 14, 15, 77, 78, 20, 21, eos]
    unfinished = [10, 11, 12, 13, 14, 15, 16, eos]
    long_answer = [10, 77, 78, 20, 21, 22, 23, 24]
    common = {
        "n": 2,
        "c": 1,
        "beta": 20,
        "tau": 3,
        "truncation_marker_ids": [9],
        "strip_ids": [eos],
        "reasoning_end_ids": end,
    }
    markovian = RSAConfig(**common)
    answers = RSAConfig(**common, variant="answer_tails")
    full = RSAConfig(**common, variant="full")
    assert carried_context(finished, markovian) == [9, 13, 14, 15]  # reasoning tail, answer ignored
    assert carried_context(finished, answers) == [20, 21]
    assert carried_context(unfinished, answers) == [9, 14, 15, 16]
    assert carried_context(unfinished, markovian) == [9, 14, 15, 16]
    assert carried_context(long_answer, answers) == [9, 22, 23, 24]
    assert carried_context([10, 77, 78, eos], answers) == [10]  # empty answer: fall back to reasoning
    assert carried_context(finished, full) == finished[:-1]
    assert carried_context([10, 11, 12], markovian) == [10, 11, 12]  # not cut, so no marker


def test_answer_tails_prompts_use_answers_of_finished_candidates():
    cfg = RSAConfig(
        n=2,
        c=2,
        t=1,
        beta=20,
        tau=3,
        variant="answer_tails",
        reasoning_end_ids=[77],
        truncation_marker_ids=[9],
    )
    problem = RSAProblem("q", prompt_ids=[100, 101])
    previous = [[10, 11, 12, 13, 77, 40], [10, 11, 12, 13, 14]]
    for prompt, parents in aggregation_prompts(problem, previous, 1, cfg, TEMPLATE):
        tails = {0: [40], 1: [9, 12, 13, 14]}
        expected = [1, 2, 3, 100, 101, 4, 5]
        for h, j in zip(TEMPLATE.candidate_header_ids, parents):
            expected += [*h, *tails[j]]
        assert prompt == expected + [11, 12, 13, 14]


def cand(score: float, answer: str | None, length: int = 1, prompt: int = 0) -> Candidate:
    return Candidate(token_ids=[0] * length, prompt_tokens=prompt, parents=(), score=score, answer=answer)


def test_metric_arithmetic():
    population = [
        [cand(1, "5", 3, 10), cand(0, "3", 2), cand(0, "3", 1), cand(0, None, 4)],  # vote '3' (wrong)
        [cand(1, "7", 1), cand(1, "7", 1, 12), cand(0, "8", 1), cand(0, None, 1)],  # vote '7' (right)
        [cand(0, None, 5), cand(0, None, 5), cand(0, None, 5), cand(0, None, 5)],  # nobody answers
    ]
    m = round_metrics(2, population)
    assert m.round == 2
    assert m.mean_accuracy == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert m.majority_accuracy == pytest.approx(1 / 3)
    assert m.pass_at_n == pytest.approx(2 / 3)
    assert m.generated_tokens == pytest.approx((10 + 4 + 20) / 3)
    assert m.max_prompt_tokens == 12
    nxt = round_metrics(3, population[:1], previous=m)
    assert nxt.cumulative_generated_tokens == pytest.approx(34 / 3 + 10)


def test_majority_ties_and_partial_scores():
    assert majority_score([cand(0, "a"), cand(1, "b")]) == 0.5  # expected score of a fair tie-break
    assert majority_score([cand(0.5, "a"), cand(1, "a"), cand(1, "b")]) == 0.75
    assert majority_score([cand(1, None)]) == 0.0


def test_results_json_has_the_exact_keys(tmp_path):
    cfg = RSAConfig(n=4, c=2, t=2, beta=20, tau=8)
    result = run(cfg, FakeGenerator(min_len=4, max_len=20))
    path = write_results(result, tmp_path / "run")
    assert path == tmp_path / "run" / "rsa_results.json"
    data = json.loads(path.read_text())
    assert data["config"]["n"] == 4 and data["config"]["final_beta"] is None and data["num_problems"] == 3
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    required = {"mean_accuracy", "majority_accuracy", "pass_at_n", "generated_tokens", "max_prompt_tokens"}
    for row, metrics in zip(data["rounds"], result.rounds):
        assert required <= row.keys()
        assert {k: row[k] for k in required} == {k: getattr(metrics, k) for k in required}
    gen_tokens = [sum(len(c.token_ids) for cands in pop for c in cands) / 3 for pop in result.populations]
    assert [r["generated_tokens"] for r in data["rounds"]] == pytest.approx(gen_tokens)
    assert data["rounds"][-1]["cumulative_generated_tokens"] == pytest.approx(sum(gen_tokens))


def test_verifier_scorer_round_trip():
    decode = lambda ids: "".join(chr(i) for i in ids)
    score = verifier_scorer(ExactMatchVerifier(), decode)
    problem = RSAProblem("q", prompt_ids=[1], reference="42")
    assert score(problem, [ord(ch) for ch in "so \\boxed{42}"]) == (1.0, "42")
    assert score(problem, [ord(ch) for ch in "so \\boxed{41}"]) == (0.0, "41")
    assert score(problem, [ord(ch) for ch in "no answer"]) == (0.0, None)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 4, "c": 5}, "c must"),
        ({"tau": 0}, "tau"),
        ({"t": -1}, "t must"),
        ({"n": 0}, "n must"),
        ({"beta": 8, "tau": 16}, "tau must be <= beta"),
        ({"final_beta": 0}, "final_beta"),
        ({"variant": "chain"}, "variant"),
        ({"variant": "answer_tails"}, "reasoning_end_ids"),
    ],
)
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RSAConfig(**kwargs)


def test_run_rejects_bad_inputs():
    cfg = RSAConfig(n=2, c=2, t=1, beta=20, tau=8)
    dupes = [RSAProblem("a", [1]), RSAProblem("a", [2])]
    with pytest.raises(ValueError, match="problem_id"):
        run_rsa(dupes, FakeGenerator(1, 2), parity_score, cfg, TEMPLATE)
    with pytest.raises(ValueError, match="generate returned"):
        run_rsa(problems(1), lambda prompts, budget, seed: [], parity_score, cfg, TEMPLATE)
    with pytest.raises(ValueError, match="tails"):
        TEMPLATE.render([1], [[2]] * 5)
