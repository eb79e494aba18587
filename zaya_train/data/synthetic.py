"""The nano task: chain sum of K two-digit numbers with running partial sums written least-significant digit
first. It is the offline data of the default `nano` recipe: problems are generated
on demand from (seed, index), answers are checked exactly, and a fixed held-out test set never enters training.

    Q37+82+15+64+29+51=730+28=911,911+51=431,431+46=891,891+92=722,722+15=872,A278

Prompt `Q` + the numbers + `=`. Solution: K-1 steps `PPP+BB=SSS` joined by `,` where PPP is the running sum so
far (zero-padded to the width of the largest possible total, then reversed), BB the next number reversed and SSS
the new running sum, padded and reversed; then `,A` and the total in normal order, zero-padded to the same
width. Every sequence of a config has the same length (80 tokens with BOS/EOS for K=6).

    from zaya_train.data.synthetic import ChainSumConfig, ChainSumDataset, held_out_problems, is_correct
    from zaya_train.data.tokenizer import char_tokenizer
    cfg = ChainSumConfig()                                   # K=6, numbers 10..99, 200 test problems (seed 12345)
    tok = char_tokenizer(NANO_CHARS)
    train = ChainSumDataset(cfg, tok, size=32_000, seed=0)   # Sequence[PackedWindow], loss on the solution only
    for p in held_out_problems(cfg): is_correct(p, model_completion_text)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from zaya_train.data.packing import IGNORE_INDEX, PackedWindow

# Task alphabet after PAD/BOS/EOS: digits, the operators, `|` and `_` for RSA aggregation prompts, Q/A markers.
NANO_CHARS = "0123456789+=,|QA_"


@dataclass
class ChainSumConfig:
    num_terms: int = 6
    low: int = 10
    high: int = 99
    test_size: int = 200
    test_seed: int = 12345
    validation_seed: int = 54321

    def __post_init__(self) -> None:
        if self.num_terms < 2:
            raise ValueError(f"chain_sum.num_terms={self.num_terms} must be at least 2")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"chain_sum.low={self.low}, chain_sum.high={self.high}: need 0 <= low <= high")
        if self.test_size < 0:
            raise ValueError(f"chain_sum.test_size={self.test_size} must be >= 0")
        distinct = (self.high - self.low + 1) ** self.num_terms
        if 2 * self.test_size > distinct // 2:
            raise ValueError(
                f"chain_sum.test_size={self.test_size} (held out, and as many for validation) leaves too few of the "
                f"{distinct} training problems"
            )

    @property
    def term_width(self) -> int:
        return len(str(self.high))

    @property
    def sum_width(self) -> int:
        return len(str(self.high * self.num_terms))


@dataclass(frozen=True)
class ChainSumProblem:
    numbers: tuple[int, ...]
    prompt: str
    solution: str
    answer: str


def make_problem(numbers: Sequence[int], config: ChainSumConfig) -> ChainSumProblem:
    numbers = tuple(int(n) for n in numbers)
    if len(numbers) != config.num_terms or any(not config.low <= n <= config.high for n in numbers):
        raise ValueError(
            f"numbers={numbers} must be {config.num_terms} values in [{config.low}, {config.high}]"
        )
    tw, sw = config.term_width, config.sum_width
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        new_total = total + n
        steps.append(
            f"{str(total).zfill(sw)[::-1]}+{str(n).zfill(tw)[::-1]}={str(new_total).zfill(sw)[::-1]}"
        )
        total = new_total
    answer = str(total).zfill(sw)
    prompt = "Q" + "+".join(str(n).zfill(tw) for n in numbers) + "="
    return ChainSumProblem(
        numbers=numbers, prompt=prompt, solution=",".join(steps) + ",A" + answer, answer=answer
    )


def _draw(rng: np.random.Generator, config: ChainSumConfig) -> tuple[int, ...]:
    return tuple(int(n) for n in rng.integers(config.low, config.high + 1, size=config.num_terms))


def held_out_problems(config: ChainSumConfig) -> list[ChainSumProblem]:
    """The first `test_size` distinct problems drawn from `test_seed`; training never yields any of them."""
    return _distinct_problems(config, config.test_seed, exclude=frozenset())


def validation_problems(config: ChainSumConfig) -> list[ChainSumProblem]:
    """`test_size` more distinct problems, from `validation_seed`, none of them held out or ever trained on: for
    choosing settings without looking at the held-out problems, which then score only the final choice."""
    return _distinct_problems(config, config.validation_seed,
                              exclude=frozenset(p.numbers for p in held_out_problems(config)))


def _distinct_problems(config: ChainSumConfig, seed: int, exclude: frozenset) -> list[ChainSumProblem]:
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < config.test_size:
        numbers = _draw(rng, config)
        if numbers not in exclude:
            seen.setdefault(numbers)
    return [make_problem(numbers, config) for numbers in seen]


_ANSWER = re.compile(r"A(\d+)")


def extract_answer(completion: str) -> str | None:
    """The digits after the last `A`, only if they end the completion (special tokens already stripped)."""
    matches = list(_ANSWER.finditer(completion.strip()))
    if not matches or matches[-1].end() != len(completion.strip()):
        return None
    return matches[-1].group(1)


def is_correct(problem: ChainSumProblem, completion: str) -> bool:
    """Exact match of the final answer, zero padding included (`A060`, not `A60`)."""
    return extract_answer(completion) == problem.answer


class ChainSumDataset(Sequence[PackedWindow]):
    """`size` training examples; example i depends only on (seed, i), so any index is reproducible without
    generating the ones before it. Each is one window `BOS prompt solution EOS` with labels on the solution and
    EOS only."""

    def __init__(self, config: ChainSumConfig, tokenizer, size: int, seed: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"ChainSumDataset size={size} must be positive")
        self.config, self.tokenizer, self.size, self.seed = config, tokenizer, size, seed

    @cached_property
    def _held_out(self) -> frozenset[tuple[int, ...]]:
        return frozenset(p.numbers for p in held_out_problems(self.config) + validation_problems(self.config))

    def __len__(self) -> int:
        return self.size

    def problem(self, index: int) -> ChainSumProblem:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        # Redraw from a fresh stream on a test-set hit, so exclusion keeps every index a pure function of seed.
        for attempt in range(1000):
            numbers = _draw(np.random.default_rng([self.seed, index, attempt]), self.config)
            if numbers not in self._held_out:
                return make_problem(numbers, self.config)
        raise AssertionError("test set covers the whole problem space")

    def __getitem__(self, index: int) -> PackedWindow:  # type: ignore[override]
        return encode_problem(self.problem(index), self.tokenizer)


def encode_problem(problem: ChainSumProblem, tokenizer) -> PackedWindow:
    prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    solution = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = np.array([tokenizer.bos_token_id, *prompt, *solution], dtype=np.int64)
    labels = np.concatenate([np.full(1 + len(prompt), IGNORE_INDEX, dtype=np.int64), np.array(solution)])
    return PackedWindow(input_ids=input_ids, labels=labels, document_ids=np.zeros_like(input_ids))
