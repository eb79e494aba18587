"""Co-design rollouts on a real (random) nano policy: aggregation prompts are built from this step's own candidates
as evaluation builds them, round 2 from round 1's outputs, within the Markovian bound; counts reconcile; the
trainer's forward with router replay reproduces the engine's logprobs."""

import pytest
import torch

from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rl.config import CodesignConfig, RLConfig
from zaya_train.rl.loop import RowBatch
from zaya_train.rl.prompts import prompt_source
from zaya_train.rl.rollouts import RolloutCollector, rollout_metrics, rollout_totals
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa import RSAConfig

P, G, C, TAU = 4, 4, 2, 5


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(NANO_CHARS)


def policy(tokenizer, seed: int) -> ZayaForCausalLM:
    torch.manual_seed(seed)
    config = preset("nano", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ZayaForCausalLM(config).eval()


def collector(model, tokenizer, max_refills=0, rank=0, world_size=1, **codesign) -> RolloutCollector:
    rl = RLConfig(prompts_per_step=P, group_size=G, max_new_tokens=20, dynamic_sampling=True, max_refills=max_refills,
                  codesign=CodesignConfig(**{"share": 0.5, "rounds": 2, "max_new_tokens": 8, **codesign}))
    rsa = RSAConfig(n=G, c=C, tau=TAU, beta=20, template="compact")
    return RolloutCollector(RolloutEngine(model), tokenizer, prompt_source("nano_chain_sum", 0), rl, rsa, seed=3,
                            rank=rank, world_size=world_size)


def by_kind(rollouts, kind):
    return [g for g in rollouts.groups if g.kind == kind]


def test_aggregation_prompts_show_tails_of_this_steps_own_candidates(tokenizer):
    rollouts = collector(policy(tokenizer, 0), tokenizer).collect(step=5)
    plain, round1, round2 = (by_kind(rollouts, k) for k in ("plain", "round1", "round2"))
    # share 0.5 over 2 rounds: a quarter of the sequences each, i.e. P * 0.25 / 0.5 = 2 problems per round
    assert (len(plain), len(round1), len(round2)) == (P, 2, 2)
    bos, bar = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("|")
    for parent_groups, child_groups in ((plain, round1), (round1, round2)):
        for parent, child in zip(parent_groups, child_groups):
            assert child.problem.problem_id == parent.problem.problem_id
            question = parent.problem.question_ids
            for t in child.trajectories:
                assert len(t.parents) == C and len(set(t.parents)) == C
                # By hand: BOS, the question, then each chosen candidate's last tau tokens (its EOS dropped) after a
                # `|`, then `|`.
                expected = [bos, *question]
                for j in t.parents:
                    ids = parent.trajectories[j].token_ids
                    ids = ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids
                    expected += [bar, *ids[-TAU:]]
                expected.append(bar)
                assert t.prompt_ids == expected
                assert len(t.prompt_ids) <= 1 + len(question) + C * (TAU + 1) + 1
                assert len(t.token_ids) <= 8


def test_a_different_policy_builds_different_aggregation_prompts(tokenizer):
    first = collector(policy(tokenizer, 0), tokenizer).collect(step=5)
    second = collector(policy(tokenizer, 1), tokenizer).collect(step=5)
    same_problems = [g.problem.problem_id for g in first.groups] == [g.problem.problem_id for g in second.groups]
    assert same_problems, "problems depend on (seed, step, rank) only"
    prompts = [[t.prompt_ids for t in g.trajectories] for g in by_kind(first, "round1")]
    assert prompts != [[t.prompt_ids for t in g.trajectories] for g in by_kind(second, "round1")]


def test_sample_counts_reconcile_per_prompt_type(tokenizer):
    rollouts = collector(policy(tokenizer, 0), tokenizer).collect(step=2)
    for group in rollouts.groups:  # a random policy never solves: dynamic sampling drops every group
        group.kept = group.problem.problem_id != rollouts.groups[0].problem.problem_id
    kinds = ["plain", "round1", "round2"]
    metrics = rollout_metrics(rollout_totals(rollouts, kinds), kinds)
    assert (metrics["samples/generated/plain"], metrics["samples/generated/round1"]) == (P * G, 2 * G)
    for suffix in ("", "/plain", "/round1", "/round2"):
        assert metrics[f"samples/generated{suffix}"] == (
            metrics[f"samples/dropped{suffix}"] + metrics[f"samples/trained{suffix}"])
    # the first problem is dropped in every round it appears in: plain, round 1 and round 2
    assert metrics["samples/dropped"] == 3 * G
    assert metrics["samples/generated"] == (P + 2 + 2) * G


def test_dropped_groups_still_feed_the_next_round(tokenizer):
    rollouts = collector(policy(tokenizer, 0), tokenizer).collect(step=1)
    assert not any(g.kept for g in rollouts.groups), "all-zero rewards: every group is dropped from training"
    assert len(by_kind(rollouts, "round2")) == 2, "yet rounds 1 and 2 are still built from them"


def test_refills_draw_fresh_problems_from_the_ranks_own_range(tokenizer):
    # A random policy solves nothing: every plain group is dropped, so each refill asks for all P problems again.
    # Rank 1 of 2 owns P / 2 problems per attempt, indices step * P * 3 + 1 * (P / 2) * 3 + attempt * P / 2 + j.
    rollouts = collector(policy(tokenizer, 0), tokenizer, max_refills=2, rank=1, world_size=2, share=0.0).collect(4)
    ids = [g.problem.problem_id for g in rollouts.groups]
    local = P // 2
    assert ids == [4 * P * 3 + local * 3 + a * local + j for a in range(3) for j in range(local)]
    assert rollouts.generated["plain"] == 3 * local * G


def test_codesign_problems_are_dealt_over_ranks_whatever_the_world_size(tokenizer):
    # share 0.5 over 2 rounds of P = 4 problems: 2 problems per round in the whole step, one on each of 2 ranks.
    counts = [collector(policy(tokenizer, 0), tokenizer, rank=r, world_size=2).round_counts for r in (0, 1)]
    assert counts == [[1, 1], [1, 1]]
    assert collector(policy(tokenizer, 0), tokenizer, share=0.2, rounds=1).round_counts == [1]
    split = [collector(policy(tokenizer, 0), tokenizer, rank=r, world_size=4, share=0.2, rounds=1).round_counts
             for r in range(4)]
    assert split == [[1], [0], [0], [0]]


def test_expert_candidates_seed_round_one(tokenizer, tmp_path):
    expert = tmp_path / "expert.jsonl"
    expert.write_text('{"question": "Q10+20=", "answer": "030", "candidates": ["111", "222", "333"]}\n')
    rollouts = collector(policy(tokenizer, 0), tokenizer, source="expert", expert_file=str(expert)).collect(step=0)
    round1 = by_kind(rollouts, "round1")
    assert [g.problem.problem_id for g in round1] == ["expert-0", "expert-0"]
    bar = tokenizer.convert_tokens_to_ids("|")
    for t in round1[0].trajectories:
        tails = tokenizer.decode(t.prompt_ids, skip_special_tokens=True).split("|")[1:-1]
        assert sorted(tails) == sorted(["111", "222", "333"][j] for j in t.parents)
        assert t.prompt_ids.count(bar) == C + 1


def test_trainer_forward_with_router_replay_reproduces_engine_logprobs(tokenizer):
    model = policy(tokenizer, 0)
    rollouts = collector(model, tokenizer).collect(step=0)
    rows = [(t, 0.0) for g in rollouts.groups for t in g.trajectories]
    batch = RowBatch(rows, tokenizer.pad_token_id, model.config.num_hidden_layers, torch.device("cpu"))
    with torch.no_grad():
        replayed = model(batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids, return_logits=False,
                         return_logprobs=True).logprobs
    gap = (replayed - batch.engine_logp).abs()[batch.mask]
    assert gap.numel() == sum(len(t.token_ids) for t, _ in rows)
    assert gap.max() <= 1e-4
    # An independent check of the row layout: the engine's logprob of the first sampled token of row 0.
    t = rows[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([t.prompt_ids])).logits[0, -1]
    assert abs(float(logits.log_softmax(-1)[t.token_ids[0]]) - t.logprobs[0]) <= 1e-4
