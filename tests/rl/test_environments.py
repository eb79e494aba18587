"""Mixed RL environments: shares, routing of each completion to its environment's verifier, batched scoring with
outcomes, filtered sources, the canary's floor reward, per-environment metrics, and the `rl.environments` keys."""

import json

import pytest

from zaya_train.rewards.base import Scored
from zaya_train.rl.config import EnvironmentConfig, FilterConfig, RLConfig, RLConfigError
from zaya_train.rl.environments import (
    EnvReference,
    FilteredSource,
    MixtureSource,
    environment_source,
    floor_reward,
    score_completions,
)
from zaya_train.rl.prompts import PromptSource
from zaya_train.rl.rollouts import Group, StepRollouts, rollout_metrics, rollout_totals
from zaya_train.rsa import RSAProblem


class Equals:
    """Reward 1 when the completion equals the reference."""

    def __init__(self):
        self.calls = 0

    def score(self, completion, reference):
        self.calls += 1
        return float(completion == reference)


class Batched(Equals):
    def score_completions(self, completions, references):
        return [Scored(float(c == r), "passed" if c == r else "failed") for c, r in zip(completions, references)]


def rows(tag, n=50):
    return [(f"{tag} question {i}", f"{tag}{i}") for i in range(n)]


def mixture(seed=0):
    sources = {"a": PromptSource(rows("a"), Equals(), seed, shuffle_rows=False),
               "b": PromptSource(rows("b"), Batched(), seed, shuffle_rows=False)}
    return MixtureSource(sources, {"a": 3.0, "b": 1.0}, seed)


def test_environments_are_drawn_in_proportion_to_their_shares_and_reproducibly():
    source = mixture()
    draws = [source.environment(i) for i in range(20_000)]
    assert abs(draws.count("a") / len(draws) - 0.75) < 0.015
    assert draws == [mixture().environment(i) for i in range(20_000)]
    assert draws != [mixture(seed=1).environment(i) for i in range(20_000)]
    question, reference = source[7]
    name = source.environment(7)
    # Problem i of the mix is problem i of its environment, its reference tagged with the environment.
    assert (question, reference) == (rows(name)[7][0], EnvReference(name, rows(name)[7][1]))


def test_each_completion_is_scored_by_its_own_environments_verifier():
    source = mixture()
    refs = [EnvReference("a", "a1"), EnvReference("b", "b2"), EnvReference("a", "a3"), EnvReference("b", "b4")]
    completions = ["a1", "b2", "wrong", "b4"]
    scored = score_completions(source.verifier, completions, refs)
    assert [s.reward for s in scored] == [1.0, 1.0, 0.0, 1.0]
    # Environment b's verifier batches and reports outcomes; a's scores one at a time and reports none.
    assert [s.outcome for s in scored] == [None, "passed", None, "passed"]
    assert source.sources["a"].verifier.calls == 2
    assert source.verifier.score("b4", EnvReference("b", "b4")) == 1.0


def test_a_filtered_source_cycles_over_the_kept_problems():
    base = mixture()
    filtered = FilteredSource(base, [3, 10, 42])
    assert [filtered[i] for i in range(5)] == [base[3], base[10], base[42], base[3], base[10]]
    assert filtered.environment(2) == base.environment(42)
    with pytest.raises(ValueError, match="no problem is left"):
        FilteredSource(base, [])


def test_the_canary_floor_is_a_reward_models_fail_reward_and_0_otherwise():
    class RewardModelLike(Equals):
        fail_reward = -3.0

    routed = MixtureSource({"rm": PromptSource(rows("r"), RewardModelLike(), 0, False),
                            "math": PromptSource(rows("m"), Equals(), 0, False)}, {"rm": 1, "math": 1}, 0)
    assert floor_reward(routed.verifier, EnvReference("rm", "x")) == -3.0
    assert floor_reward(routed.verifier, EnvReference("math", "x")) == 0.0
    assert floor_reward(Equals(), "x") == 0.0


def test_rewards_and_outcomes_are_reported_per_environment():
    def group(env, rewards, outcomes, kind="plain"):
        g = Group(kind, RSAProblem(problem_id=0, prompt_ids=[1]), [], environment=env, outcomes=outcomes)
        g.trajectories = [type("T", (), {"reward": r, "token_ids": [0] * 3})() for r in rewards]
        return g

    rollouts = StepRollouts(groups=[group("code", [1, 0, 0, 1], ["passed", "timeout", "failed", "passed"]),
                                    group("math", [1, 1, 0, 0], [None] * 4),
                                    group("code", [0, 0], ["timeout", "degenerate"], kind="round1")])
    metrics = rollout_metrics(rollout_totals(rollouts, ["plain", "round1"]), ["plain", "round1"])
    assert metrics["reward/env/code"] == pytest.approx(2 / 6)
    assert metrics["reward/env/math"] == pytest.approx(0.5)
    assert (metrics["outcomes/code/passed"], metrics["outcomes/code/timeout"], metrics["outcomes/code/failed"],
            metrics["outcomes/code/degenerate"]) == (2, 2, 1, 1)
    assert not any(k.startswith("outcomes/math/") for k in metrics)


def test_environment_keys_are_checked_and_named(tmp_path):
    assert RLConfig(data="rg:chain_sum").environment_list()[0].name == "chain_sum"
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"question": "print 1", "tests": [{"input": "", "output": "1"}]}) + "\n")
    assert RLConfig(data=f"code:{code}").environment_list()[0].name == "code"
    with pytest.raises(RLConfigError, match="rl.environments.x.data: .*no such file"):
        EnvironmentConfig(name="x", data="code:/nonexistent.jsonl")
    with pytest.raises(RLConfigError, match="rl.environments: names must be unique"):
        RLConfig(environments=[EnvironmentConfig(name="a", data="nano_chain_sum"),
                               EnvironmentConfig(name="a", data="rg:chain_sum")])
    with pytest.raises(RLConfigError, match="rl.reward_model.path"):
        RLConfig(data=f"behaviour:{code}")
    with pytest.raises(RLConfigError, match="rl.filter.pass_rate"):
        RLConfig(data="rlve", filter=FilterConfig(pass_rate=0.5))


def test_a_code_environment_scores_programs_in_the_sandbox(tmp_path):
    code = tmp_path / "code.jsonl"
    tests = [{"input": "2 3", "output": "5"}, {"input": "1 1", "output": "2"}]
    code.write_text(json.dumps({"question": "add", "tests": tests}) + "\n")
    source = environment_source(RLConfig(data=f"code:{code}"), seed=0)
    question, reference = source[0]
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    scored = score_completions(source.verifier, [right, "```python\nprint(5)\n```"], [reference, reference])
    assert question == "add" and [s.reward for s in scored] == [1.0, 0.5]
    assert [s.outcome for s in scored] == ["passed", "failed"]
