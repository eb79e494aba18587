"""CodeI/O output and input prediction on hand-made seeds: prompt rows, answers, and the sandboxed input check."""

from __future__ import annotations

import json

import pytest

from tests.rewards.test_sandbox import finishes, needs_isolation
from zaya_train.rewards import (
    CodeIOInputVerifier,
    CodeIOOutputVerifier,
    CodeVerifier,
    codeio_rows,
    codeio_verifier,
)
from zaya_train.rewards.codeio import read_seeds
from zaya_train.rl.prompts import PromptSource

SEEDS = [
    {
        "problem": "Given n, print 1 + 2 + ... + n.",
        "program": "n = int(input())\nprint(n * (n + 1) // 2)\n",
        "tests": [{"input": "3\n", "output": "6\n"}, {"input": "10\n", "output": "55\n"}],
    },
    {
        "problem": "Given n and then n integers on the next line, print their sum and their maximum.",
        "program": "n = int(input())\nxs = list(map(int, input().split()))[:n]\nprint(sum(xs), max(xs))\n",
        "tests": [{"input": "3\n1 5 2\n", "output": "8 5\n"}],
    },
    {
        "problem": "Print the words of a line of lowercase words in reverse order.",
        "program": "print(' '.join(input().split()[::-1]))\n",
        "tests": [{"input": "a b c\n", "output": "c b a\n"}, {"input": "\n", "output": "\n"}],
        "input_pattern": "[a-z]+( [a-z]+)*",
    },
]


@pytest.fixture(scope="module")
def seeds_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("codeio") / "seeds.jsonl"
    path.write_text("\n".join(json.dumps(seed) for seed in SEEDS) + "\n")
    return path


@pytest.fixture(scope="module")
def input_verifier() -> CodeIOInputVerifier:
    return CodeIOInputVerifier(CodeVerifier(time_limit_s=1, memory_mb=256, max_workers=2))


def test_output_rows_show_the_input_and_expect_the_output(seeds_path):
    rows = codeio_rows(seeds_path, "codeio_output")
    assert len(rows) == 4  # the blank output of the last seed's second test gives no row
    question, reference = rows[2]
    assert SEEDS[1]["problem"] in question and "print(sum(xs), max(xs))" in question and "3\n1 5 2" in question
    assert "Answer:" in question and reference == "8 5\n"


def test_input_rows_show_the_output_and_carry_the_program(seeds_path):
    rows = codeio_rows(seeds_path, "codeio_input")
    assert len(rows) == 4  # the blank input of the last seed's second test gives no row
    question, reference = rows[3]
    assert "c b a" in question and "a b c" not in question
    assert reference == {"program": SEEDS[2]["program"], "output": "c b a\n", "input_pattern": "[a-z]+( [a-z]+)*"}


def test_rows_fit_a_prompt_source(seeds_path):
    source = PromptSource(codeio_rows(seeds_path, "codeio_output"), codeio_verifier("codeio_output"), seed=0,
                          shuffle_rows=True)
    question, reference = source[7]
    assert isinstance(question, str) and source.verifier.score(f"Answer: {reference}", reference) == 1.0


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("The loop adds 1, 2 and 3.\nAnswer: 6", 1.0),
        ("So it prints \\boxed{6}.", 1.0),
        ("Answer:\n```\n6\n```", 1.0),  # an enclosing code fence is not part of the answer
        ("Answer: 7", 0.0),
        ("It prints 6.", 0.0),  # no final answer
    ],
)
def test_output_prediction_is_an_exact_normalised_match(completion, score):
    assert CodeIOOutputVerifier().score(completion, "6\n") == score


def test_output_prediction_compares_whitespace_normalised_text():
    assert CodeIOOutputVerifier().score("Answer:\n8\n   5", "8 5\n") == 1.0


@needs_isolation
def test_input_prediction_runs_the_program_on_the_proposed_input(seeds_path, input_verifier):
    rows = codeio_rows(seeds_path, "codeio_input")
    target_6, target_8_5 = rows[0][1], rows[2][1]
    assert finishes(input_verifier.score, "Since 1 + 2 + 3 = 6:\nAnswer: 3", target_6) == 1.0
    assert finishes(input_verifier.score, "Answer: 4", target_6) == 0.0
    # Line breaks of the proposed input reach the program: n on one line, the numbers on the next.
    assert finishes(input_verifier.score, "Answer:\n2\n3 5", target_8_5) == 1.0
    assert finishes(input_verifier.score, "Answer: 2 3 5", target_8_5) == 0.0
    run = finishes(input_verifier.run, "Answer: x", target_6)
    assert (run.score, run.outcome) == (0.0, "crashed")


@needs_isolation
def test_input_prediction_checks_the_input_pattern_first(seeds_path, input_verifier):
    target = codeio_rows(seeds_path, "codeio_input")[3][1]
    assert finishes(input_verifier.score, "Answer: a b c", target) == 1.0
    # Double spaces violate the pattern although the program would print the target.
    run = finishes(input_verifier.run, "Answer: a  b  c", target)
    assert (run.score, run.outcome) == (0.0, "failed") and "pattern" in run.reason


@needs_isolation
def test_input_prediction_scores_a_batch_with_outcomes(seeds_path, input_verifier):
    target = codeio_rows(seeds_path, "codeio_input")[0][1]
    completions = ["Answer: 3", "no idea", "Answer: 5", "Answer: 3"]
    scored = finishes(input_verifier.score_completions, completions, [target] * 4)
    assert [(s.reward, s.outcome) for s in scored] == [(1.0, "passed"), (0.0, "no_code"), (0.0, "failed"),
                                                        (1.0, "passed")]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("not json", "not JSON"),
        (json.dumps({"problem": "p", "tests": [{"input": "1", "output": "1"}]}), "'program'"),
        (json.dumps({"problem": "p", "program": "print(1)", "tests": []}), "'tests'"),
        (json.dumps({"problem": "p", "program": "print(1)", "tests": [{"input": 1, "output": "1"}]}), "test 0"),
        (json.dumps({**SEEDS[0], "input_pattern": "("}), "input_pattern"),
    ],
)
def test_a_bad_seed_is_reported_with_its_line(tmp_path, line, error):
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps(SEEDS[0]) + "\n" + line + "\n")
    with pytest.raises((ValueError, TypeError), match=error) as caught:
        read_seeds(path)
    assert f"{path}:2" in str(caught.value)


def test_an_unknown_task_is_a_value_error(seeds_path):
    with pytest.raises(ValueError, match="codeio_output"):
        codeio_rows(seeds_path, "codeio_outputs")
