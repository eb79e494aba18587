"""Verifiers: rewards in [0, 1] for model completions, plus the answer each completion commits to.

    from zaya_train.rewards import CodeVerifier, ExactMatchVerifier, MathVerifier, ReasoningGymVerifier
    reward = MathVerifier().score(completion_text, "0.75")
    vote_key = MathVerifier().extract_answer(completion_text)   # None when there is no answer
    run = CodeVerifier(time_limit_s=2).run(completion_text, {"tests": [{"input": "1 2\\n", "output": "3"}]})
    run.score, run.outcome                                      # sandboxed code: 1.0, "passed"

Every verifier shares `Verifier.score(completion, reference) -> float` and
`Verifier.extract_answer(completion) -> str | None`; `score` never raises. Code runs in
`zaya_train.rewards.sandbox`; CodeI/O prompt rows and verifiers are in `zaya_train.rewards.codeio`.
Tests: `pytest tests/rewards`.
"""

from zaya_train.rewards.base import Verifier, extract_final_answer, last_boxed, normalize_whitespace
from zaya_train.rewards.code_verifier import OUTCOMES, CaseResult, CodeRun, CodeVerifier, outcome_counts
from zaya_train.rewards.codeio import CodeIOInputVerifier, CodeIOOutputVerifier, codeio_rows, codeio_verifier
from zaya_train.rewards.exact_match import ExactMatchVerifier
from zaya_train.rewards.math_verifier import MathVerifier
from zaya_train.rewards.reasoning_gym_verifier import ReasoningGymVerifier

__all__ = [
    "OUTCOMES",
    "CaseResult",
    "CodeIOInputVerifier",
    "CodeIOOutputVerifier",
    "CodeRun",
    "CodeVerifier",
    "ExactMatchVerifier",
    "MathVerifier",
    "ReasoningGymVerifier",
    "Verifier",
    "codeio_rows",
    "codeio_verifier",
    "extract_final_answer",
    "last_boxed",
    "normalize_whitespace",
    "outcome_counts",
]
