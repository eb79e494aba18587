"""A deterministic stand-in for the rollout engine, for RSA tests."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

VOCAB_LOW, VOCAB_HIGH = 1000, 50_000  # above every template/marker id the tests use


@dataclass(frozen=True)
class FakeResult:
    token_ids: list[int]


@dataclass
class FakeGenerator:
    """Each output is a function of (seed, position in the batch, prompt): same call, same tokens.

    Lengths are drawn in [min_len, max_len] and capped at the budget; every call is logged.
    """

    min_len: int
    max_len: int
    calls: list[tuple[list[list[int]], int | list[int], int]] = field(default_factory=list)

    def __call__(
        self, prompts: list[list[int]], max_new_tokens: int | list[int], seed: int
    ) -> list[FakeResult]:
        self.calls.append(([list(p) for p in prompts], max_new_tokens, seed))
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        out = []
        for j, (prompt, budget) in enumerate(zip(prompts, budgets)):
            digest = hashlib.blake2b(repr((seed, j, tuple(prompt))).encode(), digest_size=8).digest()
            rng = random.Random(int.from_bytes(digest, "little"))
            length = min(budget, rng.randint(self.min_len, self.max_len))
            out.append(FakeResult([rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)]))
        return out
