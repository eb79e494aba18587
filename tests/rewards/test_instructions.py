"""Instruction-following constraints, checked by hand: `pytest tests/rewards/test_instructions.py` (instant)."""

from __future__ import annotations

import pytest

from zaya_train.rewards.instructions import InstructionChecker, count_words


@pytest.fixture
def checker():
    return InstructionChecker()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", 0),
        ("one", 1),
        ("  two\twords\n", 2),
        ("don't stop - 3.14 well-known !!", 4),  # the lone "-" and "!!" hold no letter or digit
        ("héllo wörld", 2),
    ],
)
def test_count_words(text, words):
    assert count_words(text) == words


@pytest.mark.parametrize(
    ("spec", "response", "expected"),
    [
        ({"type": "max_words", "value": 3}, "one two three", True),
        ({"type": "max_words", "value": 3}, "one two three four", False),
        ({"type": "max_words", "value": 0}, "", True),
        ({"type": "min_words", "value": 3}, "one two three", True),
        ({"type": "min_words", "value": 3}, "one two", False),
        ({"type": "min_words", "value": 2}, "one -- !!", False),
        ({"type": "keywords", "value": ["Paris", "river"]}, "The RIVER runs through paris.", True),
        ({"type": "keywords", "value": ["Paris", "river"]}, "The river runs through Lyon.", False),
        ({"type": "keywords", "value": ["cat"]}, "A category of things.", False),  # whole words only
        ({"type": "keywords", "value": ["cat"]}, "My cat, asleep.", True),
        ({"type": "keywords", "value": ["C++"]}, "I write c++ daily.", True),
        ({"type": "keywords", "value": ["New York"]}, "I love new york!", True),
        ({"type": "json"}, '{"a": [1, 2]}', True),
        ({"type": "json"}, '  [1, "x", null]\n', True),
        ({"type": "json"}, '```json\n{"a": 1}\n```', True),
        ({"type": "json"}, '```\n{"a": 1}\n```', True),
        ({"type": "json"}, 'Here you go:\n```json\n{"a": 1}\n```', False),  # the whole response must be JSON
        ({"type": "json"}, '{"a": 1', False),
        ({"type": "json"}, "{'a': 1}", False),
        ({"type": "json"}, "", False),
        ({"type": "no_commas"}, "No commas here.", True),
        ({"type": "no_commas"}, "One, two.", False),
        ({"type": "no_commas"}, "", True),
    ],
)
def test_each_builtin_by_hand(checker, spec, response, expected):
    assert checker.check_all(response, [spec]) == (expected, [expected])


def test_check_all_reports_each_constraint(checker):
    constraints = [
        {"type": "max_words", "value": 5},
        {"type": "no_commas"},
        {"type": "keywords", "value": ["blue"]},
    ]
    assert checker.check_all("Red, green and blue.", constraints) == (False, [True, False, True])
    assert checker.check_all("Red and blue.", constraints) == (True, [True, True, True])
    assert checker.check_all("anything at all, really", []) == (True, [])


def test_describe_all_phrases_constraints_in_words(checker):
    constraints = [
        {"type": "max_words", "value": 50},
        {"type": "min_words", "value": 1},
        {"type": "keywords", "value": ["sun", "moon"]},
        {"type": "json"},
        {"type": "no_commas"},
    ]
    assert checker.describe_all(constraints) == (
        'Answer in at most 50 words. Answer in at least 1 word. Include the keywords "sun", "moon". '
        "Answer with valid JSON only. Do not use any commas."
    )


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ([{"type": "max_sentences", "value": 2}], "unknown type 'max_sentences'"),
        ([{"value": 2}], "'type' key"),
        (["max_words"], "'type' key"),
        ([{"type": "max_words"}], "constraints\\[0\\].*'max_words'.*value"),  # missing parameter
        ([{"type": "no_commas", "value": 1}], "constraints\\[0\\].*'no_commas'"),  # unexpected parameter
        ([{"type": "json"}, {"type": "max_words", "value": -1}], "constraints\\[1\\].*non-negative"),
        ([{"type": "max_words", "value": 2.5}], "non-negative integer"),
        ([{"type": "max_words", "value": True}], "non-negative integer"),
        ([{"type": "keywords", "value": "paris"}], "non-empty list"),
        ([{"type": "keywords", "value": []}], "non-empty list"),
        ([{"type": "keywords", "value": ["a", " "]}], "non-empty string"),
    ],
)
def test_bad_specs_fail_at_validation_naming_the_constraint(checker, constraints, message):
    with pytest.raises(ValueError, match=message):
        checker.validate(constraints)
    with pytest.raises(ValueError, match=message):  # check_all refuses before checking anything
        checker.check_all("text", constraints)


def test_constraints_must_be_a_list(checker):
    with pytest.raises(TypeError, match="list of dicts"):
        checker.validate({"type": "json"})


def test_users_register_their_own_constraints(checker):
    checker.register(
        "ends_with",
        check=lambda response, value: response.rstrip().endswith(value),
        describe=lambda value: f"End your answer with {value!r}.",
    )
    spec = [{"type": "ends_with", "value": "Done."}, {"type": "no_commas"}]
    assert checker.check_all("All good. Done.", spec) == (True, [True, True])
    assert checker.check_all("Done. All good", spec) == (False, [False, True])
    assert checker.describe_all(spec) == "End your answer with 'Done.'. Do not use any commas."
    assert "ends_with" in checker.types
    assert "ends_with" not in InstructionChecker().types  # registries are per checker
    with pytest.raises(ValueError, match="already registered"):
        checker.register("no_commas", check=lambda response: True, describe=lambda: "")


def test_a_registered_validator_runs_at_validation(checker):
    def positive(value):
        if value <= 0:
            raise ValueError(f"value={value} must be positive")

    checker.register(
        "max_lines",
        lambda response, value: len(response.splitlines()) <= value,
        lambda value: f"Use at most {value} lines.",
        validate=positive,
    )
    assert checker.check_all("a\nb", [{"type": "max_lines", "value": 2}]) == (True, [True])
    with pytest.raises(ValueError, match="constraints\\[0\\] \\('max_lines'\\): value=0 must be positive"):
        checker.validate([{"type": "max_lines", "value": 0}])
