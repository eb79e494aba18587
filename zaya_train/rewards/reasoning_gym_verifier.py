"""reasoning-gym tasks scored by each task's own `score_answer`.

    import reasoning_gym
    from zaya_train.rewards import ReasoningGymVerifier
    ds = reasoning_gym.create_dataset("chain_sum", size=100, seed=0)
    v = ReasoningGymVerifier(ds, answer_marker="Answer:")
    v.score("... Answer: 214", ds[2])        # the reference is the dataset entry itself

The answer is the completion's last `\\boxed{}` or, without one, the text after the last `answer_marker`.
With no dataset given, the scorer is looked up from the entry's `metadata["source_dataset"]` with the
task's default config, which is enough for tasks whose scoring does not depend on config values.
Some scorers give partial credit (e.g. a right answer with extra text); scores pass through, clipped to
[0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import reasoning_gym

from zaya_train.rewards.base import Verifier, extract_final_answer

ScoreFn = Callable[[str | None, dict[str, Any]], float]


class ReasoningGymVerifier(Verifier):
    def __init__(self, dataset: Any | None = None, answer_marker: str | None = None):
        super().__init__(answer_marker)
        if dataset is not None and not callable(getattr(dataset, "score_answer", None)):
            raise TypeError(f"dataset must have a score_answer method, got {type(dataset).__name__}")
        self.dataset = dataset
        self._by_task: dict[str, ScoreFn] = {}

    def extract_answer(self, completion: str) -> str | None:
        # Task scorers compare layout (grids, lists) themselves, so only the ends are trimmed.
        answer = extract_final_answer(completion, self.answer_marker)
        return None if answer is None else answer.strip()

    def _scorer(self, entry: Mapping[str, Any]) -> ScoreFn:
        if self.dataset is not None:
            return self.dataset.score_answer
        task = entry["metadata"]["source_dataset"]
        if task not in self._by_task:
            self._by_task[task] = reasoning_gym.get_score_answer_fn(task)
        return self._by_task[task]

    def _score_answer(self, answer: str, reference: Any) -> float:
        if not isinstance(reference, Mapping):
            return 0.0
        return self._scorer(reference)(answer, reference)
