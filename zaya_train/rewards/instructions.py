"""Verifiable instruction-following constraints, the gate of behavioural RL (ZAYA1 RL stage 4).

    from zaya_train.rewards.instructions import InstructionChecker
    checker = InstructionChecker()
    constraints = [{"type": "max_words", "value": 50}, {"type": "no_commas"}]
    checker.validate(constraints)                      # ValueError now for an unknown type or a bad value
    checker.check_all("Short and sweet.", constraints)  # -> (True, [True, True])
    checker.describe_all(constraints)                   # -> "Answer in at most 50 words. Do not use any commas."

A constraint is a dict: `"type"` names a registered constraint and every other key is passed to its check as a
keyword argument. The built-ins take their parameter as `"value"`:

    {"type": "min_words", "value": 20}       at least 20 words
    {"type": "max_words", "value": 50}       at most 50 words
    {"type": "keywords", "value": ["a", "b"]}  every keyword appears as a whole word, case-insensitively
    {"type": "json"}                         the whole response is JSON (a ```json fenced block is allowed)
    {"type": "no_commas"}                    no ASCII comma anywhere (as IFEval)

A word is a whitespace-separated token holding at least one letter or digit, so "don't" and "3.14" are one word
each and a lone "-" is none. Register your own with `checker.register(name, check, describe, validate)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from inspect import signature
from typing import Any

_FENCED = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?```\Z", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Constraint:
    check: Callable[..., bool]
    """check(response, **params) -> whether the response satisfies the constraint."""
    describe: Callable[..., str]
    """describe(**params) -> the instruction in words, as appended to a prompt."""
    validate: Callable[..., None] | None = None
    """validate(**params) raises ValueError for bad parameter values; the signature is checked regardless."""


def count_words(response: str) -> int:
    return sum(1 for token in response.split() if any(ch.isalnum() for ch in token))


def _word_count_value(value: Any) -> None:
    # bool is an int subclass; `True` words is a spec mistake, not a count of one.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"value={value!r} must be a non-negative integer word count")


def _keywords_value(value: Any) -> None:
    # A bare string is the likely mistake: iterating it would require each of its characters.
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"value={value!r} must be a non-empty list of keywords")
    if not all(isinstance(k, str) and k.strip() for k in value):
        raise ValueError(f"value={value!r}: every keyword must be a non-empty string")


def _has_keyword(response: str, keyword: str) -> bool:
    # Whole-word match so "cat" is not found in "category"; lookarounds (not \b) also work for "C++".
    return re.search(rf"(?<!\w){re.escape(keyword.strip())}(?!\w)", response, re.IGNORECASE) is not None


def _is_json(response: str) -> bool:
    text = response.strip()
    fenced = _FENCED.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:  # JSONDecodeError is a ValueError
        return False
    return True


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


BUILTIN_CONSTRAINTS: dict[str, Constraint] = {
    "min_words": Constraint(
        check=lambda response, value: count_words(response) >= value,
        describe=lambda value: f"Answer in at least {_plural(value, 'word')}.",
        validate=_word_count_value,
    ),
    "max_words": Constraint(
        check=lambda response, value: count_words(response) <= value,
        describe=lambda value: f"Answer in at most {_plural(value, 'word')}.",
        validate=_word_count_value,
    ),
    "keywords": Constraint(
        check=lambda response, value: all(_has_keyword(response, k) for k in value),
        describe=lambda value: "Include the keywords " + ", ".join(f'"{k}"' for k in value) + ".",
        validate=_keywords_value,
    ),
    "json": Constraint(
        check=_is_json,
        describe=lambda: "Answer with valid JSON only.",
    ),
    "no_commas": Constraint(
        check=lambda response: "," not in response,
        describe=lambda: "Do not use any commas.",
    ),
}


class InstructionChecker:
    """A registry of constraints (the built-ins, plus any registered) that checks responses against them."""

    def __init__(self, constraints: Mapping[str, Constraint] | None = None) -> None:
        self._registry = dict(BUILTIN_CONSTRAINTS if constraints is None else constraints)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._registry))

    def register(
        self,
        name: str,
        check: Callable[..., bool],
        describe: Callable[..., str],
        validate: Callable[..., None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"constraint name={name!r} must be a non-empty string")
        # Silently replacing a built-in would change the meaning of every dataset that uses it.
        if name in self._registry:
            raise ValueError(f"constraint type {name!r} is already registered")
        self._registry[name] = Constraint(check, describe, validate)

    def validate(self, constraints: Any) -> None:
        """Raise ValueError naming the offending constraint if any is malformed, of an unknown type, or has
        missing, unexpected or bad parameters (TypeError if `constraints` is not a list), so a bad spec fails when
        data is loaded, not mid-training."""
        if not isinstance(constraints, list):
            raise TypeError(f"constraints={constraints!r} must be a list of dicts")
        for i, spec in enumerate(constraints):
            self._validate_one(i, spec)

    def _validate_one(self, i: int, spec: Any) -> None:
        if not isinstance(spec, dict) or "type" not in spec:
            raise ValueError(f"constraints[{i}]={spec!r} must be a dict with a 'type' key")
        kind = spec["type"]
        if kind not in self._registry:
            raise ValueError(f"constraints[{i}]: unknown type {kind!r}; registered types: {self.types}")
        constraint, params = self._registry[kind], _params(spec)
        try:
            signature(constraint.check).bind("", **params)
            if constraint.validate is not None:
                constraint.validate(**params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"constraints[{i}] ({kind!r}): {err}") from err

    def check(self, response: str, spec: dict[str, Any]) -> bool:
        return bool(self._registry[spec["type"]].check(response, **_params(spec)))

    def check_all(self, response: str, constraints: list[dict[str, Any]]) -> tuple[bool, list[bool]]:
        """(every constraint holds, one result per constraint); no constraints pass trivially."""
        self.validate(constraints)
        results = [self.check(response, spec) for spec in constraints]
        return all(results), results

    def describe_all(self, constraints: list[dict[str, Any]]) -> str:
        self.validate(constraints)
        return " ".join(self._registry[spec["type"]].describe(**_params(spec)) for spec in constraints)


def _params(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "type"}
