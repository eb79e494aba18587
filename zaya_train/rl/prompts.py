"""RL prompt sources: problem i of `rl.data` as (question text, reference) with the verifier that scores it.

    source = prompt_source("nano_chain_sum", seed=0)
    question, reference = source[1234]            # any index; a pure function of (data, seed, index)
    source.verifier.score(completion_text, reference)

`nano_chain_sum`: the nano task's training distribution (the evaluation's held-out problems never appear).
`rg:<task>`: a reasoning-gym task generated offline, entry i of a dataset seeded by `seed`. A local jsonl of
`question` / `answer` rows, or `hub:<name>` (train split; real runs only): rows in a seeded order, reshuffled every
pass. Because problem i depends on nothing but its index, a resumed run asks for the same problems as an
uninterrupted one by storing one integer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from zaya_train.rewards import ExactMatchVerifier, MathVerifier, ReasoningGymVerifier, Verifier

# reasoning-gym datasets generate entry i from (seed, i); this is the size of the index space we draw from.
RG_DATASET_SIZE = 1_000_000


class PromptSource:
    def __init__(self, rows: Any, verifier: Verifier, seed: int, shuffle_rows: bool) -> None:
        self.rows, self.verifier, self.seed, self.shuffle_rows = rows, verifier, seed, shuffle_rows
        self._orders: dict[int, np.ndarray] = {}

    def __getitem__(self, index: int) -> tuple[str, Any]:
        if index < 0:
            raise IndexError(f"problem index must be >= 0, got {index}")
        size = len(self.rows)
        if not self.shuffle_rows:
            return self.rows[index % size]
        epoch, offset = divmod(index, size)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(size)}
        return self.rows[int(self._orders[epoch][offset])]

    def solution(self, index: int) -> str | None:
        """A worked solution of problem `index` when the data has one (the nano task does), else None."""
        solution = getattr(self.rows, "solution", None)
        return solution(index) if solution is not None and not self.shuffle_rows else None


class _ChainSumRows:
    def __init__(self, seed: int) -> None:
        from zaya_train.data import ChainSumConfig
        from zaya_train.data.synthetic import ChainSumDataset

        self.dataset = ChainSumDataset(ChainSumConfig(), tokenizer=None, size=2**62, seed=seed)

    def __len__(self) -> int:
        return self.dataset.size

    def __getitem__(self, index: int) -> tuple[str, Any]:
        problem = self.dataset.problem(index)
        return problem.prompt, problem.answer

    def solution(self, index: int) -> str:
        return self.dataset.problem(index).solution


class _ReasoningGymRows:
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        entry = self.dataset[index]
        return entry["question"], entry


def qa_rows(rows: list[dict[str, Any]], where: str) -> list[tuple[str, str]]:
    out = []
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{where}: row {i} has no 'question' and 'answer' fields (keys: {sorted(row)})")
        out.append((str(row["question"]), str(row["answer"])))
    if not out:
        raise ValueError(f"{where}: no rows")
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from err
    return rows


def nano_verifier() -> Verifier:
    """The nano task's reward: the digits after the final `A`, exactly."""
    return ExactMatchVerifier(answer_marker="A")


def prompt_source(data: str, seed: int) -> PromptSource:
    if data == "nano_chain_sum":
        return PromptSource(_ChainSumRows(seed), nano_verifier(), seed, shuffle_rows=False)
    if data.startswith("rg:"):
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(data[3:], size=RG_DATASET_SIZE, seed=seed)
        return PromptSource(_ReasoningGymRows(dataset), ReasoningGymVerifier(dataset), seed, shuffle_rows=False)
    if data.startswith("hub:"):
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(data[4:], split="train")]
        return PromptSource(qa_rows(rows, data), MathVerifier(), seed, shuffle_rows=True)
    return PromptSource(qa_rows(read_jsonl(data), data), MathVerifier(), seed, shuffle_rows=True)
