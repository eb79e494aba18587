"""Math answers checked for mathematical equivalence with math-verify.

    from zaya_train.rewards import MathVerifier
    MathVerifier().score("Thus \\boxed{\\frac{3}{4}}", "0.75")   # -> 1.0

The answer is the content of the completion's last `\\boxed{}` (or the text after `answer_marker` when no
box is present); it is parsed as LaTeX by math-verify and compared with the gold answer, which may be plain
(`0.75`, `3/4`), LaTeX (`\\frac{3}{4}`), already boxed, or a number.

Threads: math-verify bounds parsing and comparison time with `signal.alarm`, which only works in the
main thread and makes it raise anywhere else. Off the main thread this verifier turns those timeouts off
and bounds the work instead by refusing answers longer than `max_answer_chars`; in the main thread the
timeouts stay on.
"""

from __future__ import annotations

import threading
from typing import Any

from math_verify import parse, verify

from zaya_train.rewards.base import Verifier


class MathVerifier(Verifier):
    def __init__(
        self,
        answer_marker: str | None = None,
        timeout_seconds: int = 5,
        max_answer_chars: int = 1000,
    ):
        super().__init__(answer_marker)
        if timeout_seconds < 1:
            raise ValueError(f"timeout_seconds must be >= 1, got {timeout_seconds}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self.timeout_seconds = timeout_seconds
        self.max_answer_chars = max_answer_chars

    def _timeout(self) -> int | None:
        return self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

    def _score_answer(self, answer: str, reference: Any) -> float:
        if len(answer) > self.max_answer_chars:
            return 0.0
        timeout = self._timeout()
        gold_text = str(reference).strip()
        if not gold_text:
            return 0.0
        # Bare gold strings are wrapped in math mode so LaTeX golds (`\frac{3}{4}`) and plain ones (`0.75`)
        # go through the same parser; golds that carry their own delimiters are left alone.
        if "$" not in gold_text and "\\boxed" not in gold_text:
            gold_text = f"${gold_text}$"
        gold = parse(gold_text, parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
