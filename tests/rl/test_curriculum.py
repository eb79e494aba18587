"""The RLVE curriculum: update rule, least-sampled-first sampling, resume, the reasoning-gym prompt source."""

import json
import re
from collections import Counter

import pytest

from zaya_train.rl.curriculum import (
    BOXED_INSTRUCTION,
    RLVE_DEFAULT_ENVIRONMENTS,
    Curriculum,
    CurriculumSource,
    max_difficulty,
)
from zaya_train.rsa.core import stable_hash64


def set_difficulty(source: CurriculumSource, difficulty: dict[str, int]) -> None:
    state = source.state_dict()
    source.load_state_dict({**state, "difficulty": {**state["difficulty"], **difficulty}})


def test_levels_come_from_the_reasoning_gym_curricula():
    # gcd has 4 levels; chain_sum's terms run 2..12 (11 levels); leg_counting has 36.
    assert (max_difficulty("gcd"), max_difficulty("chain_sum"), max_difficulty("leg_counting")) == (3, 10, 35)
    started = Curriculum(["gcd", "chain_sum"], seed=0, start_difficulty=7)
    assert started.difficulty == {"gcd": 3, "chain_sum": 7}
    with pytest.raises(ValueError, match="not_a_task"):
        Curriculum(["not_a_task"], seed=0)
    with pytest.raises(ValueError, match="at most once"):
        Curriculum(["gcd", "gcd"], seed=0)


def test_update_rule_on_a_scripted_sequence():
    cur = Curriculum(["gcd", "chain_sum"], seed=0)  # gcd: levels 0..3
    # (group result, gcd difficulty after it) worked out by hand from the rule.
    script = [
        (("gcd", 0, 0.0), 0),   # solve rate 0 at the bottom: clamped at 0
        (("gcd", 0, 0.8), 1),   # > 0.7 at the current difficulty: up
        (("gcd", 1, 0.7), 1),   # exactly the threshold: unchanged
        (("gcd", 1, 0.71), 2),  # up
        (("gcd", 1, 1.0), 2),   # generated at 1, d is now 2: stale, counted only
        (("gcd", 2, 0.9), 3),   # up to the top level
        (("gcd", 3, 1.0), 3),   # clamped at the top
        (("gcd", 3, 0.5), 3),   # between 0 and the threshold: unchanged
        (("gcd", 3, 0.0), 2),   # solve rate 0: down
        (("gcd", 3, 0.0), 2),   # stale: a solve rate of 0 at an old difficulty does not move it
        (("gcd", 2, 0.01), 2),  # not exactly 0: unchanged
    ]
    for n, (result, expected) in enumerate(script, 1):
        cur.observe([result])
        assert cur.difficulty == {"gcd": expected, "chain_sum": 0}, (n, result)
        assert cur.groups == {"gcd": n, "chain_sum": 0}

    # One step's groups apply in order: the first moves d, the rest of that step are then stale.
    cur.observe([("chain_sum", 0, 0.9), ("chain_sum", 0, 0.9), ("chain_sum", 0, 0.0)])
    assert cur.difficulty["chain_sum"] == 1
    cur.observe([("chain_sum", 1, 0.0), ("chain_sum", 1, 1.0)])
    assert cur.difficulty["chain_sum"] == 0
    assert cur.groups["chain_sum"] == 5
    metrics = cur.metrics()
    assert metrics["curriculum/difficulty/gcd"] == 2.0 and metrics["curriculum/groups/gcd"] == 11.0
    assert metrics["curriculum/mean_difficulty"] == 1.0
    assert metrics["curriculum/mean_progress"] == pytest.approx((2 / 3 + 0 / 10) / 2)


def test_observe_skips_other_environments_and_rejects_bad_rates_atomically():
    cur = Curriculum(["gcd"], seed=0)
    cur.observe([("chain_sum", 0, 1.0)])  # another curriculum's environment
    assert cur.groups == {"gcd": 0}
    with pytest.raises(ValueError, match="solve rate"):
        cur.observe([("gcd", 0, 1.0), ("gcd", 0, 1.5)])
    assert cur.difficulty == {"gcd": 0} and cur.groups == {"gcd": 0}


def test_least_sampled_environments_are_sampled_most():
    cur = Curriculum(["chain_sum", "gcd", "lcm"], seed=3)
    assert cur.probabilities() == pytest.approx({"chain_sum": 1 / 3, "gcd": 1 / 3, "lcm": 1 / 3})
    # Rate 0.5 counts groups without moving difficulties: counts 5, 6, 8.
    cur.observe([("chain_sum", 0, 0.5)] * 5 + [("gcd", 0, 0.5)] * 6 + [("lcm", 0, 0.5)] * 8)
    # Weights 1/(1 + count - 5) = 1, 1/2, 1/4, normalised by 7/4.
    expected = {"chain_sum": 4 / 7, "gcd": 2 / 7, "lcm": 1 / 7}
    assert cur.probabilities() == pytest.approx(expected)
    n = 20_000
    counts = Counter(cur.choose(i) for i in range(n))
    for env, p in expected.items():
        assert counts[env] / n == pytest.approx(p, abs=0.015), (env, counts)
    # Choosing reads the state and never changes it.
    assert cur.groups == {"chain_sum": 5, "gcd": 6, "lcm": 8}
    assert [cur.choose(i) for i in range(50)] == [cur.choose(i) for i in range(50)]


def scripted_steps(cur: Curriculum, steps: range, per_step: int = 16) -> list[list[str]]:
    """Choose each step's environments from one state, then observe scripted solve rates (hash-driven)."""
    choices = []
    for step in steps:
        envs = [cur.choose(step * per_step + j) for j in range(per_step)]
        rates = [(stable_hash64("rate", step, j) % 5) / 4 for j in range(per_step)]  # 0, .25, .5, .75, 1
        cur.observe([(env, cur.difficulty[env], rate) for env, rate in zip(envs, rates)])
        choices.append(envs)
    return choices


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run():
    envs = ["chain_sum", "gcd", "leg_counting", "coin_flip"]
    uninterrupted = Curriculum(envs, seed=11)
    reference = scripted_steps(uninterrupted, range(8))

    first = Curriculum(envs, seed=11)
    assert scripted_steps(first, range(4)) == reference[:4]
    saved = json.dumps(first.state_dict())
    resumed = Curriculum(envs, seed=11)
    resumed.load_state_dict(json.loads(saved))
    assert scripted_steps(resumed, range(4, 8)) == reference[4:]
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert any(d > 0 for d in uninterrupted.difficulty.values())  # the script moved something

    with pytest.raises(ValueError, match="environments"):
        Curriculum(["gcd"], seed=11).load_state_dict(json.loads(saved))


def test_source_problems_are_deterministic_in_state_seed_and_index():
    envs = ["chain_sum", "gcd", "coin_flip"]
    a, b = CurriculumSource(envs, seed=5), CurriculumSource(envs, seed=5)
    assert [a[i] for i in range(30)] == [b[i] for i in range(30)]
    assert [a[i] for i in range(30)] != [CurriculumSource(envs, seed=6)[i] for i in range(30)]
    assert a.solution(0) is None and a.shuffle_rows is False

    # After an update, problem i of the new state is the same on any source holding that state.
    a.observe([("chain_sum", 0, 1.0), ("gcd", 0, 0.5)])
    resumed = CurriculumSource(envs, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a[i] for i in range(30)] == [resumed[i] for i in range(30)]
    for i in range(30):
        question, reference = a[i]
        assert reference["rlve_env"] == reference["metadata"]["source_dataset"] == a.curriculum.choose(i)
        assert reference["rlve_difficulty"] == a.curriculum.difficulty[reference["rlve_env"]]
        assert question == reference["question"]


def test_a_harder_level_generates_harder_problems():
    source = CurriculumSource(["chain_sum"], seed=0)
    easy = [source[i][1] for i in range(20)]
    set_difficulty(source, {"chain_sum": 3})
    hard = [source[i][1] for i in range(20)]
    # Level 0: two 1-digit terms; level 3: five 4-digit terms.
    assert {(e["metadata"]["num_terms"], e["metadata"]["num_digits"]) for e in easy} == {(2, 1)}
    assert {(e["metadata"]["num_terms"], e["metadata"]["num_digits"]) for e in hard} == {(5, 4)}
    assert all(int(n) < 10 for e in easy for n in re.findall(r"\d+", e["metadata"]["expression"]))
    assert all(int(n) >= 1000 for e in hard for n in re.findall(r"\d+", e["metadata"]["expression"]))
    assert {e["rlve_difficulty"] for e in hard} == {3}


@pytest.mark.parametrize("env", RLVE_DEFAULT_ENVIRONMENTS)
def test_each_default_environment_scores_its_own_answer_at_every_end_of_its_levels(env):
    source = CurriculumSource([env], seed=1, instruction=BOXED_INSTRUCTION)
    marked = CurriculumSource([env], seed=1, answer_marker="Answer:")
    configs = {}
    for d in (0, max_difficulty(env)):
        set_difficulty(source, {env: d})
        set_difficulty(marked, {env: d})
        for i in (0, 1, 10**7):
            question, reference = source[i]
            assert question.endswith(BOXED_INSTRUCTION) and reference["rlve_difficulty"] == d
            answer = str(reference["answer"])
            assert source.verifier.score(f"So the answer is \\boxed{{{answer}}}.", reference) == 1.0, (d, i)
            assert source.verifier.score("\\boxed{zq}", reference) == 0.0, (d, i)
            assert marked.verifier.score(f"work\nAnswer: {answer}", marked[i][1]) == 1.0, (d, i)
        configs[d] = reference["metadata"].get("difficulty")
    # The level reaches the generator: the generated problems' recorded configs differ between the ends.
    assert configs[0] != configs[max_difficulty(env)]
