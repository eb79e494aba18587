"""Exact string match after whitespace normalisation, for tasks whose answers are literal strings.

    from zaya_train.rewards import ExactMatchVerifier
    v = ExactMatchVerifier(answer_marker="A")
    v.score("730+28=911,...,A278", "278")       # -> 1.0
    v.score("\\boxed{ New   York }", "new york")  # -> 0.0; 1.0 with case_sensitive=False

Both sides have runs of whitespace collapsed to one space and their ends trimmed before comparing.
"""

from __future__ import annotations

from typing import Any

from zaya_train.rewards.base import Verifier, normalize_whitespace


class ExactMatchVerifier(Verifier):
    def __init__(self, answer_marker: str | None = None, case_sensitive: bool = True):
        super().__init__(answer_marker)
        self.case_sensitive = case_sensitive

    def _canonical(self, text: str) -> str:
        text = normalize_whitespace(text)
        return text if self.case_sensitive else text.casefold()

    def extract_answer(self, completion: str) -> str | None:
        answer = super().extract_answer(completion)
        return None if answer is None else self._canonical(answer)

    def _score_answer(self, answer: str, reference: Any) -> float:
        gold = self._canonical(str(reference))
        return 1.0 if gold and self._canonical(answer) == gold else 0.0
