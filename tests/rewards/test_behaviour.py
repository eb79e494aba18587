"""The gated behavioural reward and its prompt rows: `pytest tests/rewards/test_behaviour.py` (offline, a few
seconds; one tiny randomly initialised reward model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaForSequenceClassification

from zaya_train.data.tokenizer import train_bpe
from zaya_train.rewards.behaviour import BehaviouralReward, behaviour_rows, final_response
from zaya_train.rewards.instructions import InstructionChecker
from zaya_train.rewards.reward_model import RewardModelScorer, write_tiny_reward_model

FAIL = -7.0
SHORT_NO_COMMAS = [{"type": "max_words", "value": 5}, {"type": "no_commas"}]


class TableScorer:
    """A stand-in RM: a fixed score per response, recording what it was asked."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table, self.calls = table, []

    def score_many(self, prompts, completions):
        self.calls.append((list(prompts), list(completions)))
        return [self.table[c] for c in completions]


class BrokenScorer:
    def score_many(self, prompts, completions):
        raise RuntimeError("out of memory")


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    tok = train_bpe(
        texts=["the quick brown fox jumps over the lazy dog", "hello world, how are you?"] * 4, vocab_size=300
    )
    return tok, write_tiny_reward_model(tmp_path_factory.mktemp("rm"), tok, seed=0)


def rm_by_hand(rm, prompt: str, response: str) -> float:
    tok, model_dir = rm
    ids = tok(f"<|bos|><|user|>\n{prompt}<|eos|><|assistant|>\n{response}<|eos|>", add_special_tokens=False)
    model = LlamaForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0].item()


def test_gate_passes_to_the_rm_score_and_fails_to_fail_reward(rm):
    reward = BehaviouralReward(RewardModelScorer(rm[1]), InstructionChecker(), fail_reward=FAIL)
    reference = {"prompt": "Describe the sky briefly.", "constraints": SHORT_NO_COMMAS}
    passing, too_long, comma = "Blue and wide.", "Blue and wide and very very high.", "Blue, wide."
    expected = rm_by_hand(rm, reference["prompt"], passing)
    assert reward.score(passing, reference) == pytest.approx(expected, abs=1e-5)
    assert reward.score(too_long, reference) == FAIL
    assert reward.score(comma, reference) == FAIL
    batched = reward.score_many([reference["prompt"]] * 3, [passing, too_long, comma], [reference] * 3)
    assert batched == pytest.approx([expected, FAIL, FAIL], abs=1e-5)
    assert reward.counts == {"gate_passed": 2, "gate_failed": 4, "errors": 0}


def test_only_passing_responses_reach_the_rm_in_one_batch():
    scorer = TableScorer({"ok one": 0.5, "ok two": -2.0})
    reward = BehaviouralReward(scorer, fail_reward=FAIL)
    refs = [{"constraints": [{"type": "no_commas"}]}] * 3
    assert reward.score_many(["p1", "p2", "p3"], ["ok one", "no, way", "ok two"], refs) == [0.5, FAIL, -2.0]
    assert scorer.calls == [(["p1", "p3"], ["ok one", "ok two"])]


def test_no_constraints_means_the_plain_rm_score():
    reward = BehaviouralReward(TableScorer({"Sure, here it is.": 1.25}), fail_reward=FAIL)
    assert reward.score("Sure, here it is.", {"prompt": "Write a poem."}) == 1.25
    assert reward.score("Sure, here it is.", {"prompt": "Write a poem.", "constraints": []}) == 1.25


def test_reasoning_is_stripped_before_the_gate_and_the_rm():
    scorer = TableScorer({"Fine answer.": 2.0})
    reward = BehaviouralReward(scorer, fail_reward=FAIL)
    ref = {"prompt": "q", "constraints": [{"type": "no_commas"}, {"type": "max_words", "value": 2}]}
    thinking = "<think>first, second, third, lots of words in here</think>\n Fine answer."
    assert reward.score(thinking, ref) == 2.0
    assert scorer.calls == [(["q"], ["Fine answer."])]
    assert reward.score("<think>never, finished", ref) == FAIL  # no response at all
    assert reward.counts == {"gate_passed": 1, "gate_failed": 1, "errors": 0}


@pytest.mark.parametrize(
    ("completion", "response"),
    [
        ("plain", "plain"),
        ("<think>a</think>b", "b"),
        ("<think>a</think>x</think> y ", "y"),
        ("<think>a", None),
    ],
)
def test_final_response(completion, response):
    assert final_response(completion) == response


def test_never_raises_and_counts_errors():
    def explode(response):
        raise RuntimeError("bug in a user check")

    checker = InstructionChecker()
    checker.register("explode", explode, lambda: "")
    reward = BehaviouralReward(TableScorer({"x": 1.0, "nan": math.nan}), checker, fail_reward=FAIL)
    bad_references = [
        None,
        "a string",
        {"constraints": []},
        {"prompt": 3},
        {"prompt": "p", "constraints": "no"},
        {"prompt": "p", "constraints": [{"type": "unknown"}]},
        {"prompt": "p", "constraints": [{"type": "explode"}]},
    ]
    assert [reward.score("x", r) for r in bad_references] == [FAIL] * len(bad_references)
    assert reward.score(None, {"prompt": "p"}) == FAIL
    assert reward.score("nan", {"prompt": "p"}) == FAIL  # a non-finite RM score is no reward
    assert BehaviouralReward(BrokenScorer(), fail_reward=FAIL).score("x", {"prompt": "p"}) == FAIL
    assert reward.reset_counts() == {"gate_passed": 1, "gate_failed": 0, "errors": 9}
    assert reward.counts == {"gate_passed": 0, "gate_failed": 0, "errors": 0}


def test_interface_details():
    reward = BehaviouralReward(TableScorer({}), fail_reward=FAIL)
    assert reward.extract_answer("anything") is None
    with pytest.raises(ValueError, match="2 prompts, 1 completions and 1 references"):
        reward.score_many(["a", "b"], ["c"], [{}])
    with pytest.raises(ValueError, match="fail_reward=nan"):
        BehaviouralReward(TableScorer({}), fail_reward=math.nan)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_behaviour_rows_phrase_the_constraints(tmp_path):
    path = write_jsonl(
        tmp_path / "if.jsonl",
        [
            {
                "prompt": "Describe Paris.  ",
                "constraints": [{"type": "max_words", "value": 50}, {"type": "no_commas"}],
            },
            {"prompt": "Write a haiku."},
        ],
    )
    question = "Describe Paris.\n\nAnswer in at most 50 words. Do not use any commas."
    assert behaviour_rows(path) == [
        (
            question,
            {"prompt": question, "constraints": [{"type": "max_words", "value": 50}, {"type": "no_commas"}]},
        ),
        ("Write a haiku.", {"prompt": "Write a haiku.", "constraints": []}),
    ]


def test_behaviour_rows_reject_bad_rows_naming_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"if.jsonl:2: constraints\[0\]: unknown type 'max_lines'"):
        behaviour_rows(
            write_jsonl(
                tmp_path / "if.jsonl",
                [{"prompt": "a"}, {"prompt": "b", "constraints": [{"type": "max_lines"}]}],
            )
        )
    with pytest.raises(ValueError, match="if.jsonl:1: a row needs a non-empty 'prompt'"):
        behaviour_rows(write_jsonl(tmp_path / "if.jsonl", [{"question": "a"}]))
    with pytest.raises(TypeError, match="if.jsonl:1: constraints="):
        behaviour_rows(write_jsonl(tmp_path / "if.jsonl", [{"prompt": "a", "constraints": {"type": "json"}}]))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        behaviour_rows(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        behaviour_rows(tmp_path / "empty.jsonl")


def test_rows_accept_user_constraints_through_their_checker(tmp_path):
    checker = InstructionChecker()
    checker.register(
        "ends_with", lambda response, value: response.endswith(value), lambda value: f"End with {value}."
    )
    path = write_jsonl(
        tmp_path / "if.jsonl", [{"prompt": "Go.", "constraints": [{"type": "ends_with", "value": "!"}]}]
    )
    ((question, reference),) = behaviour_rows(path, checker)
    assert question == "Go.\n\nEnd with !."
    reward = BehaviouralReward(TableScorer({"Done!": 3.0}), checker, fail_reward=FAIL)
    assert reward.score("Done!", reference) == 3.0
    assert reward.score("Done.", reference) == FAIL
