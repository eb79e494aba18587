"""The verifier interface and the answer extraction every verifier shares.

    from zaya_train.rewards import MathVerifier
    v = MathVerifier()
    v.score("... so the answer is \\boxed{3/4}.", "0.75")    # -> 1.0
    v.extract_answer("... \\boxed{3/4}.")                      # -> "3/4" (used for majority voting)

A verifier turns a model completion and a reference into a reward in [0, 1]. `score` never raises: a
missing, empty or malformed answer, and any failure inside a third-party scorer, give 0.0, because one
bad completion must not stop an RL step or an evaluation over thousands of them.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass
from typing import Any

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_WHITESPACE = re.compile(r"\s+")


@dataclass
class Scored:
    """A reward and, from verifiers that say, why it is what it is (a sandbox outcome, an instruction gate)."""

    reward: float
    outcome: str | None = None


def normalize_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at `text[open_index]`, or None if it never closes."""
    depth = 0
    for i in range(open_index, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), stripped; None if absent, empty or unclosed.

    Only the last box counts: a model that boxes a draft answer and later a corrected one means the
    later one, and an unclosed last box is a truncated answer, not a reason to fall back to a draft.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    brace = start + len(cmd)
    while brace < len(text) and text[brace] == " ":
        brace += 1
    if brace >= len(text) or text[brace] != "{":
        return None
    content = _braced_content(text, brace)
    if content is None:
        return None
    content = content.strip()
    return content or None


def extract_final_answer(completion: str, answer_marker: str | None = None) -> str | None:
    """The last boxed answer; failing that, the text after the last `answer_marker` (if one is set)."""
    if not isinstance(completion, str) or not completion:
        return None
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if answer_marker:
        at = completion.rfind(answer_marker)
        if at >= 0:
            tail = completion[at + len(answer_marker) :].strip()
            return tail or None
    return None


class Verifier(abc.ABC):
    """Scores completions against references; subclasses implement `_score_answer`."""

    def __init__(self, answer_marker: str | None = None):
        if answer_marker is not None and not answer_marker:
            raise ValueError(f"answer_marker must be None or a non-empty string, got {answer_marker!r}")
        self.answer_marker = answer_marker

    def extract_answer(self, completion: str) -> str | None:
        """The answer a completion commits to, as a string comparable across completions (for voting)."""
        answer = extract_final_answer(completion, self.answer_marker)
        return None if answer is None else normalize_whitespace(answer)

    def score(self, completion: str, reference: Any) -> float:
        """Reward in [0, 1]; 0.0 for a missing or malformed answer. Never raises."""
        try:
            answer = self.extract_answer(completion)
            if answer is None:
                return 0.0
            value = float(self._score_answer(answer, reference))
        # Third-party scorers (sympy inside math-verify, reasoning-gym's task code) raise a wide range of
        # exception types on odd inputs; any of them means "not verifiably correct".
        except Exception:  # noqa: BLE001
            return 0.0
        if math.isnan(value):  # NaN from a scorer is not a reward
            return 0.0
        return min(1.0, max(0.0, value))

    @abc.abstractmethod
    def _score_answer(self, answer: str, reference: Any) -> float:
        """Score an extracted, non-empty answer against the reference."""
