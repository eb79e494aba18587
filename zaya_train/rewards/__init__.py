"""Verifiers: rewards in [0, 1] for model completions, plus the answer each completion commits to.

    from zaya_train.rewards import ExactMatchVerifier, MathVerifier, ReasoningGymVerifier
    reward = MathVerifier().score(completion_text, "0.75")
    vote_key = MathVerifier().extract_answer(completion_text)   # None when there is no answer

Every verifier shares `Verifier.score(completion, reference) -> float` and
`Verifier.extract_answer(completion) -> str | None`; `score` never raises. Tests: `pytest tests/rewards`.
"""

from zaya_train.rewards.base import Verifier, extract_final_answer, last_boxed, normalize_whitespace
from zaya_train.rewards.exact_match import ExactMatchVerifier
from zaya_train.rewards.math_verifier import MathVerifier
from zaya_train.rewards.reasoning_gym_verifier import ReasoningGymVerifier

__all__ = [
    "ExactMatchVerifier",
    "MathVerifier",
    "ReasoningGymVerifier",
    "Verifier",
    "extract_final_answer",
    "last_boxed",
    "normalize_whitespace",
]
