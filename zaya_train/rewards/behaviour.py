"""The behavioural RL reward (ZAYA1 RL stage 4): a reward-model score, gated by verifiable instructions.

    from zaya_train.rewards.behaviour import BehaviouralReward, behaviour_rows
    rows = behaviour_rows("if_prompts.jsonl")      # [(question, {"prompt": question, "constraints": [...]}), ...]
    reward = BehaviouralReward(RewardModelScorer("/models/rm"), InstructionChecker(), fail_reward=-5.0)
    reward.score(completion, rows[0][1])           # RM score if every constraint holds, else fail_reward
    reward.score_many(prompts, completions, references)   # the same, with one batched RM call
    reward.counts                                  # {"gate_passed": ..., "gate_failed": ..., "errors": ...}

Gate: the response (the completion after its last `</think>`, when it reasons first) is checked against the
reference's `constraints`; if all hold, the reward is the RM's score of (reference prompt, response), else
`fail_reward`. A reference without constraints always passes, so plain RM prompts (HelpSteer-style) and
instruction-following prompts share one reward. A completion whose `<think>` never closes has no response and
fails; a malformed reference or a crash in a check or in the RM gives `fail_reward` and counts as an error.

`fail_reward` has no default because RM scores are unbounded and every RM has its own scale: it must sit below
the scores of passing responses, or GRPO's (r - mean) / std would push the policy towards breaking the
constraints. How far below sets how much the gate outweighs the RM's preferences within a group (a group whose
responses all fail has equal rewards and no gradient). A few units under the RM's low percentile on the prompt
set is a reasonable start.

A jsonl row for `behaviour_rows` is `{"prompt": str, "constraints": [...]}` (constraints optional); the question
is the prompt with the constraints appended in words. Schema of a constraint: `zaya_train.rewards.instructions`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from zaya_train.data.tokenizer import THINK_CLOSE, THINK_OPEN
from zaya_train.rewards.base import Scored
from zaya_train.rewards.instructions import InstructionChecker


class PairScorer(Protocol):
    """What the reward needs of a reward model, e.g. `RewardModelScorer`."""

    def score_many(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


def final_response(completion: str) -> str | None:
    """The answer part of a completion: the text after the last `</think>`; None when reasoning never closes."""
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1].strip()
    return None if THINK_OPEN in completion else completion


class BehaviouralReward:
    def __init__(
        self, scorer: PairScorer, checker: InstructionChecker | None = None, *, fail_reward: float
    ) -> None:
        if not math.isfinite(fail_reward):
            raise ValueError(f"fail_reward={fail_reward} must be a finite number")
        self.scorer, self.checker = scorer, checker or InstructionChecker()
        self.fail_reward = float(fail_reward)
        self._lock = threading.Lock()
        self._counts = {"gate_passed": 0, "gate_failed": 0, "errors": 0}

    @property
    def counts(self) -> dict[str, int]:
        """Since construction or the last `reset_counts`: gate passes, gate failures, and errors (malformed
        references, crashing checks or RM calls, non-finite RM scores), for the metrics of a step."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> dict[str, int]:
        """The counts so far, then zero them (one call per RL step)."""
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        return counts

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def extract_answer(self, completion: str) -> str | None:
        """Behavioural responses commit to no answer to vote on (the RSA scorer interface asks)."""
        return None

    def score(self, completion: str, reference: Any) -> float:
        """The gated RM reward of one completion; `reference["prompt"]` is what the RM sees as the prompt.
        Never raises."""
        try:
            prompt = reference["prompt"]
            if not isinstance(prompt, str):
                raise TypeError(f"reference prompt={prompt!r} is not a string")
        # Any malformed reference (None, a list, no prompt) means no verifiable reward, not a crashed RL step.
        except Exception:  # noqa: BLE001
            self._count("errors")
            return self.fail_reward
        return self.score_many([prompt], [completion], [reference])[0]

    def score_many(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[Any]
    ) -> list[float]:
        """`score` for many completions with one batched RM call over those that pass the gate. Raises only
        when the three sequences differ in length."""
        if not len(prompts) == len(completions) == len(references):
            raise ValueError(
                f"{len(prompts)} prompts, {len(completions)} completions and {len(references)} references"
            )
        return self._gated(prompts, completions, references)[0]

    def score_completions(self, completions: Sequence[str], references: Sequence[Any]) -> list[Scored]:
        """`score_many` with each prompt taken from its reference, and whether each completion passed its
        constraints (`gate_passed` / `gate_failed`) as the outcome the RL metrics count."""
        prompts = [r.get("prompt") if isinstance(r, dict) and isinstance(r.get("prompt"), str) else ""
                   for r in references]
        rewards, passed = self._gated(prompts, completions, references)
        return [Scored(r, "gate_passed" if p else "gate_failed") for r, p in zip(rewards, passed)]

    def _gated(self, prompts: Sequence[str], completions: Sequence[str],
               references: Sequence[Any]) -> tuple[list[float], list[bool]]:
        responses = [self._gate(c, r) for c, r in zip(completions, references)]
        passing = [i for i, r in enumerate(responses) if r is not None]
        passed = [r is not None for r in responses]
        rewards = [self.fail_reward] * len(completions)
        if not passing:
            return rewards, passed
        try:
            scores = self.scorer.score_many([prompts[i] for i in passing], [responses[i] for i in passing])
        # The RM is third-party code on arbitrary text; a failure must not stop the step.
        except Exception:  # noqa: BLE001
            self._count("errors", len(passing))
            return rewards, passed
        for i, s in zip(passing, scores):
            if math.isfinite(s):
                rewards[i] = float(s)
            else:
                self._count("errors")
        return rewards, passed

    def _gate(self, completion: str, reference: Any) -> str | None:
        """The response to score when every constraint holds, else None (counted)."""
        try:
            constraints = reference.get("constraints", [])
            response = final_response(completion)
            passed = response is not None and self.checker.check_all(response, constraints)[0]
        # A malformed reference or a user-registered check that crashes fails the gate rather than the step.
        except Exception:  # noqa: BLE001
            self._count("errors")
            return None
        self._count("gate_passed" if passed else "gate_failed")
        return response if passed else None


def behaviour_rows(path: str | Path, checker: InstructionChecker | None = None) -> list[tuple[str, dict]]:
    """(question, reference) rows from a jsonl of `{"prompt": str, "constraints": [...]}`; every constraint is
    validated here, so a typo fails when the data loads rather than mid-training."""
    checker = checker or InstructionChecker()
    rows = [_behaviour_row(checker, row, f"{path}:{n}") for n, row in _jsonl_lines(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _behaviour_row(checker: InstructionChecker, row: Any, where: str) -> tuple[str, dict]:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: a row needs a non-empty 'prompt' string, got {row!r}")
    constraints = row.get("constraints", [])
    try:
        instructions = checker.describe_all(constraints)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from err
    question = f"{prompt.rstrip()}\n\n{instructions}" if instructions else prompt
    return question, {"prompt": question, "constraints": constraints}


def _jsonl_lines(path: str | Path) -> list[tuple[int, Any]]:
    # `zaya_train.rl.prompts.read_jsonl` does this too, but rewards/ sits below rl/ and may not import it.
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from err
    return rows
