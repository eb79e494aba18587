"""Verifiers: `pytest tests/rewards` (offline, a few seconds)."""

from __future__ import annotations

import threading

import pytest
import reasoning_gym

from zaya_train.rewards import (
    ExactMatchVerifier,
    MathVerifier,
    ReasoningGymVerifier,
    extract_final_answer,
    last_boxed,
)

MALFORMED = [
    "",
    "The answer is 0.75",  # no box and no marker
    "\\boxed{3/4",  # unbalanced: the box never closes
    "\\boxed{}",
    "\\boxed{   }",
    "\\boxed",
    "\\boxed{{3/4}",
    "}}}{{\\boxed{\x00\ufffd}",
    "\ud800\U0001f600\u202e\\boxed{\u0000\u200b}",  # lone surrogate, emoji, bidi override
    "\\boxed{\\frac{3}{}}",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x \\boxed{3/4} y", "3/4"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("draft \\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed {5}", "5"),
        ("\\boxed{1} then \\boxed{2", None),  # a truncated last box does not fall back to the draft
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_answer_marker_used_only_without_a_box():
    assert extract_final_answer("work\nAnswer: 42 ", "Answer:") == "42"
    assert extract_final_answer("Answer: 1\nAnswer: 2", "Answer:") == "2"
    assert extract_final_answer("Answer: 1 \\boxed{9}", "Answer:") == "9"
    assert extract_final_answer("Answer:   ", "Answer:") is None
    assert extract_final_answer("Answer: 42", None) is None


def test_math_equivalent_forms_score_one():
    v = MathVerifier()
    assert v.score("so the answer is \\boxed{3/4}.", "0.75") == 1.0
    assert v.score("\\boxed{\\frac{3}{4}}", "0.75") == 1.0
    assert v.score("\\boxed{0.75}", "\\frac{3}{4}") == 1.0
    assert v.score("\\boxed{0.75}", 0.75) == 1.0
    assert v.score("\\boxed{0.7}", "0.75") == 0.0
    assert v.extract_answer("... \\boxed{ 3 / 4 }") == "3 / 4"


@pytest.mark.parametrize("text", MALFORMED)
def test_math_malformed_scores_zero(text):
    v = MathVerifier()
    assert v.score(text, "0.75") == 0.0
    assert v.score(text, "") == 0.0


def test_math_malformed_extracts_none():
    v = MathVerifier()
    assert [v.extract_answer(t) for t in MALFORMED[:7]] == [None] * 7


def test_math_overlong_answer_is_refused():
    v = MathVerifier(max_answer_chars=10)
    assert v.score("\\boxed{0.750000000000}", "0.75") == 0.0
    assert v.score("\\boxed{0.75}", "0.75") == 1.0


def test_math_scores_from_a_worker_thread():
    # math-verify's own timeout uses signal.alarm and raises ValueError off the main thread.
    v = MathVerifier()
    out: dict[str, object] = {}

    def work():
        try:
            out["scores"] = [v.score("\\boxed{3/4}", "0.75"), v.score("\\boxed{1/4}", "0.75")]
        except Exception as err:  # noqa: BLE001 (re-raised in the main thread's assert below)
            out["error"] = err

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert "error" not in out
    assert out["scores"] == [1.0, 0.0]


@pytest.fixture(scope="module")
def chain_sum():
    return reasoning_gym.create_dataset("chain_sum", size=3, seed=7)


def test_reasoning_gym_round_trip(chain_sum):
    entry = chain_sum[0]
    gold = str(entry["answer"])
    wrong = str(int(gold) + 1)
    for verifier in (ReasoningGymVerifier(chain_sum), ReasoningGymVerifier()):  # explicit and looked-up
        assert verifier.score(f"Working...\n\\boxed{{{gold}}}", entry) == 1.0
        assert verifier.score(f"Working...\n\\boxed{{{wrong}}}", entry) == 0.0
    marked = ReasoningGymVerifier(chain_sum, answer_marker="Final answer:")
    assert marked.score(f"steps\nFinal answer: {gold}\n", entry) == 1.0
    assert marked.extract_answer(f"Final answer:  {gold} ") == gold


@pytest.mark.parametrize("text", MALFORMED)
def test_reasoning_gym_malformed_scores_zero(chain_sum, text):
    assert ReasoningGymVerifier(chain_sum).score(text, chain_sum[0]) == 0.0


def test_reasoning_gym_bad_reference_scores_zero(chain_sum):
    v = ReasoningGymVerifier()
    assert v.score("\\boxed{3}", "not an entry") == 0.0
    assert v.score("\\boxed{3}", {"answer": "3", "metadata": {"source_dataset": "no_such_task"}}) == 0.0
    with pytest.raises(TypeError, match="dataset"):
        ReasoningGymVerifier(dataset=object())


def test_exact_match_normalises_whitespace():
    v = ExactMatchVerifier()
    assert v.score("\\boxed{ New \n  York }", "New York") == 1.0
    assert v.score("\\boxed{new york}", "New York") == 0.0
    assert ExactMatchVerifier(case_sensitive=False).score("\\boxed{new york}", " New  York") == 1.0
    assert v.score("\\boxed{New Yorkshire}", "New York") == 0.0
    assert v.extract_answer("\\boxed{ a\t b }") == "a b"
    nano = ExactMatchVerifier(answer_marker="A")
    assert nano.score("730+28=911,911+51=431,A278", "278") == 1.0
    assert nano.score("730+28=911,911+51=431,A279", "278") == 0.0


@pytest.mark.parametrize("text", MALFORMED)
def test_exact_match_malformed_scores_zero(text):
    assert ExactMatchVerifier().score(text, "0.75") == 0.0


def test_empty_answer_marker_is_rejected():
    with pytest.raises(ValueError, match="answer_marker"):
        ExactMatchVerifier(answer_marker="")
