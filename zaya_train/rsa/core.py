"""Markovian RSA: rounds of sampling where round t sees only short tails of round t-1's candidates.

    from zaya_train.rsa import RSAConfig, RSAProblem, TextAggregationTemplate, run_rsa, verifier_scorer
    from zaya_train.rsa import write_results
    cfg = RSAConfig(n=16, c=4, t=2, beta=8192, tau=4096, truncation_marker_ids=encode("..."))
    template = TextAggregationTemplate.from_text(encode, max_candidates=cfg.c)
    score = verifier_scorer(MathVerifier(), tokenizer.decode)
    result = run_rsa(problems, engine.generate, score, cfg, template)
    write_results(result, run_dir)

`generate` is any callable with the `Generate` signature (the rollout engine's `generate`, a vLLM wrapper,
a test fake); it gets every prompt of a round, for all problems, in one call.

Round 0 samples N rollouts of each problem prompt. Round t >= 1 builds N aggregation prompts per problem,
each from the problem's question and the carried context of C distinct candidates of round t-1 (only
t-1: that is the Markov property). The carried context depends on `RSAConfig.variant`:
- "markovian": the last tau tokens of the candidate's reasoning, cut on token boundaries, with the
  truncation marker in front when something was cut. Prompts stay <= |question| + C*(tau + |marker|) +
  template overhead (`max_aggregation_prompt_len`) however long the chains grow.
- "full": the whole candidate (RSA as published).
- "answer_tails": the answer after the reasoning when the candidate finished, cut like a tail; otherwise
  its reasoning tail.

With C = 1 candidate i of round t continues candidate i of round t-1 (parallel Delethink-style
continuation) instead of a random one, so no chain is dropped or duplicated. With C > 1 the subset is
drawn without replacement by an RNG seeded from a hash of (seed, problem id, round, candidate index), so it
does not depend on global random state, batch order or the other problems in the run.

Round 0 always uses the budget beta; the last aggregation round uses final_beta, the others beta.

RL trains the model inside the same procedure (the ZAYA1-8B report, arXiv 2605.05365, §VI; RSA itself is
arXiv 2509.26626) and builds its prompts with the function `run_rsa` uses, so evaluation and training cannot
drift apart. One aggregation step for one problem, from its previous round's trajectories:

    bos = [tokenizer.bos_token_id]
    prompts = population_prompts(problem, [tr.token_ids for tr in previous], round_idx, k, cfg, template,
                                 seed=step_seed, bos_ids=bos)   # a new step_seed every RL step
    results = engine.generate([p.prompt_ids for p in prompts], max_new_tokens=cfg.beta, seed=step_seed)
    batch = [Trajectory.from_rollout(problem.problem_id, round_idx, p.prompt_ids, r, p.parents)
             for p, r in zip(prompts, results)]
    longest_row = max_aggregation_prompt_len(problem, cfg, template, bos_ids=bos) + cfg.beta
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from zaya_train.rsa.config import RSAConfig
from zaya_train.rsa.metrics import RoundMetrics, round_metrics
from zaya_train.rsa.template import AggregationTemplate

if TYPE_CHECKING:
    import torch


class GenerationResult(Protocol):
    @property
    def token_ids(self) -> Sequence[int]:
        """Newly generated tokens only (no prompt)."""
        ...


class RolloutOutput(GenerationResult, Protocol):
    """One engine generation as RL needs it; `zaya_train.rollout.RolloutResult` is one."""

    @property
    def logprobs(self) -> Sequence[float]:
        """Log-probability of each new token under the sampling policy."""
        ...

    @property
    def expert_ids(self) -> torch.Tensor:
        """[len(prompt) + len(token_ids), layers] router choices, prompt positions included."""
        ...

    @property
    def finish_reason(self) -> str: ...


class Generate(Protocol):
    def __call__(
        self, prompts: list[list[int]], max_new_tokens: int | list[int], seed: int
    ) -> Sequence[GenerationResult]:
        """One result per prompt, in order."""
        ...


class AnswerVerifier(Protocol):
    def score(self, completion: str, reference: Any) -> float: ...

    def extract_answer(self, completion: str) -> str | None: ...


@dataclass
class RSAProblem:
    problem_id: str | int
    """Stable id; it seeds the subset choice, so renaming a problem changes its subsets."""
    prompt_ids: list[int]
    """Round-0 prompt (e.g. the question inside the chat template)."""
    question_ids: list[int] | None = None
    """The question as placed inside aggregation prompts; None means prompt_ids."""
    reference: Any = None
    """Whatever the scorer compares against (a gold answer, a reasoning-gym entry)."""

    @property
    def aggregation_question_ids(self) -> list[int]:
        return self.prompt_ids if self.question_ids is None else self.question_ids


Scorer = Callable[[RSAProblem, list[int]], tuple[float, str | None]]
"""(problem, completion token ids) -> (score in [0, 1], extracted answer or None)."""


@dataclass
class Candidate:
    token_ids: list[int]
    prompt_tokens: int
    parents: tuple[int, ...]
    """Indices into the previous round's candidates of the same problem; () in round 0."""
    score: float
    answer: str | None


@dataclass
class RSAResult:
    config: RSAConfig
    problems: list[RSAProblem]
    populations: list[list[list[Candidate]]]
    """populations[round][problem][candidate]."""
    rounds: list[RoundMetrics]


def verifier_scorer(verifier: AnswerVerifier, decode: Callable[[list[int]], str]) -> Scorer:
    """A scorer that decodes the completion and asks a `zaya_train.rewards` verifier."""

    def score(problem: RSAProblem, token_ids: list[int]) -> tuple[float, str | None]:
        text = decode(token_ids)
        return verifier.score(text, problem.reference), verifier.extract_answer(text)

    return score


def stable_hash64(*parts: object) -> int:
    """A 64-bit hash of `parts` that every process computes alike (repr of ints and strings is stable across
    processes, unlike hash() under PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def generation_seed(seed: int, round_idx: int) -> int:
    """Seed passed to `generate` for one round (31 bits, which every sampler accepts)."""
    return stable_hash64("generate", seed, round_idx) & 0x7FFF_FFFF


def choose_parents(
    seed: int, problem_id: str | int, round_idx: int, candidate_idx: int, n: int, c: int
) -> tuple[int, ...]:
    """Indices of the c distinct round-(round_idx-1) candidates (out of n) shown to prompt `candidate_idx`.

    With c = 1 prompt i continues candidate i, wrapping around when there are more prompts than candidates,
    so every chain is continued as evenly as the prompt count allows.
    """
    if c == 1:
        return (candidate_idx % n,)
    rng = random.Random(stable_hash64("subset", seed, problem_id, round_idx, candidate_idx))
    return tuple(rng.sample(range(n), c))


def _find_last(ids: Sequence[int], pattern: Sequence[int]) -> int:
    k = len(pattern)
    for start in range(len(ids) - k, -1, -1):
        if list(ids[start : start + k]) == list(pattern):
            return start
    return -1


def split_reasoning(
    token_ids: Sequence[int], reasoning_end_ids: Sequence[int]
) -> tuple[list[int], list[int] | None]:
    """(reasoning, answer) split at the last `reasoning_end_ids`; answer None if they never appear."""
    ids = list(token_ids)
    if not reasoning_end_ids:
        return ids, None
    at = _find_last(ids, reasoning_end_ids)
    if at < 0:
        return ids, None
    return ids[:at], ids[at + len(reasoning_end_ids) :]


def cut_tail(token_ids: Sequence[int], tau: int, marker_ids: Sequence[int]) -> list[int]:
    """The last tau tokens, with the marker in front when anything was cut."""
    ids = list(token_ids)
    if len(ids) <= tau:
        return ids
    return [*marker_ids, *ids[-tau:]]


def carried_context(token_ids: Sequence[int], config: RSAConfig) -> list[int]:
    """What a candidate contributes to an aggregation prompt under `config.variant`."""
    ids = list(token_ids)
    strip = set(config.strip_ids)
    while ids and ids[-1] in strip:
        ids.pop()
    if config.variant == "full":
        return ids
    reasoning, answer = split_reasoning(ids, config.reasoning_end_ids)
    # An empty answer (stopped right after the end marker) says nothing; the reasoning tail does.
    part = answer if config.variant == "answer_tails" and answer else reasoning
    return cut_tail(part, config.tau, config.truncation_marker_ids)


class AggregationPrompt(NamedTuple):
    prompt_ids: list[int]
    parents: tuple[int, ...]
    """Indices into the population the prompt was built from, in the order their tails appear."""


def population_prompts(
    problem: RSAProblem,
    population: Sequence[Sequence[int]],
    round_idx: int,
    k: int,
    config: RSAConfig,
    template: AggregationTemplate,
    *,
    seed: int,
    bos_ids: Sequence[int] = (),
) -> list[AggregationPrompt]:
    """`k` aggregation prompts of round `round_idx` for one problem, from any round-(round_idx-1) population.

    `population` holds each candidate's generated token ids; whether it finished is read from them
    (`config.reasoning_end_ids`), as `carried_context` does. `k` need not be the population size. Each prompt
    shows config.c distinct candidates, chosen from `seed`, the problem id, the round and the prompt index (not
    from config.seed): `run_rsa` passes config.seed, an RL loop a new seed every step. `bos_ids` go in front of
    every prompt, so that the returned ids are exactly what the engine is fed and what a `Trajectory` records.
    """
    if round_idx < 1:
        raise ValueError(f"round_idx must be >= 1 for aggregation prompts, got {round_idx}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(population)
    if n < config.c:
        raise ValueError(f"population must hold at least config.c={config.c} candidates, got {n}")
    contexts = [carried_context(ids, config) for ids in population]
    question = problem.aggregation_question_ids
    out = []
    for i in range(k):
        parents = choose_parents(seed, problem.problem_id, round_idx, i, n, config.c)
        prompt = [*bos_ids, *template.render(question, [contexts[j] for j in parents])]
        out.append(AggregationPrompt(prompt, parents))
    return out


def aggregation_prompts(
    problem: RSAProblem,
    previous: Sequence[Sequence[int]],
    round_idx: int,
    config: RSAConfig,
    template: AggregationTemplate,
) -> list[AggregationPrompt]:
    """The N prompts `run_rsa` builds for round `round_idx` of one problem from round-1's N candidates."""
    if len(previous) != config.n:
        raise ValueError(f"previous must hold config.n={config.n} candidates, got {len(previous)}")
    return population_prompts(problem, previous, round_idx, config.n, config, template, seed=config.seed)


def max_aggregation_prompt_len(
    problem: RSAProblem, config: RSAConfig, template: AggregationTemplate, bos_ids: Sequence[int] = ()
) -> int:
    """The longest prompt `population_prompts` can build for `problem`: |bos| + |question| + template overhead +
    C * (tau + |marker|), reached when every shown tail was cut.

    Under "full" a candidate is carried whole, so the bound takes C * beta instead and holds for populations
    generated under beta (every round but the last). The template's overhead is read by rendering it around
    empty tails, which is exact for templates that only add fixed pieces, like `TextAggregationTemplate`.
    """
    longest = config.beta if config.variant == "full" else config.tau + len(config.truncation_marker_ids)
    shell = template.render(problem.aggregation_question_ids, [[] for _ in range(config.c)])
    return len(bos_ids) + len(shell) + config.c * longest


@dataclass(eq=False)  # expert_ids is a tensor, whose == is elementwise
class Trajectory:
    """One generated sequence as RL trains on it. Build it with `Trajectory.from_rollout`; set `reward` once
    the sequence is scored."""

    problem_id: str | int
    round: int
    prompt_ids: list[int]
    """The ids the engine was fed, BOS included when the caller added one: the context of token_ids."""
    token_ids: list[int]
    """New tokens only."""
    logprobs: list[float]
    expert_ids: torch.Tensor
    """[len(prompt_ids) + len(token_ids), layers], for router replay."""
    finish_reason: str
    parents: tuple[int, ...]
    """Indices into the previous round's population; () in round 0."""
    reward: float | None = None

    @classmethod
    def from_rollout(
        cls,
        problem_id: str | int,
        round_idx: int,
        prompt_ids: Sequence[int],
        result: RolloutOutput,
        parents: tuple[int, ...] = (),
    ) -> Trajectory:
        """The record of `result`, generated from exactly `prompt_ids` (what the engine was fed)."""
        if (round_idx == 0) != (not parents):
            raise ValueError(
                f"parents must be empty exactly in round 0, got {parents!r} in round {round_idx}"
            )
        if len(result.logprobs) != len(result.token_ids):
            raise ValueError(f"result has {len(result.logprobs)} logprobs for {len(result.token_ids)} tokens")
        # The engine routes every position it was fed, so a prompt that differs from the engine's (typically by a
        # BOS added on one side only) shows up as a row-count mismatch.
        positions = len(prompt_ids) + len(result.token_ids)
        if len(result.expert_ids) != positions:
            raise ValueError(
                f"result.expert_ids has {len(result.expert_ids)} rows but prompt_ids + token_ids hold {positions} "
                "tokens: prompt_ids must be exactly the ids the engine was fed (BOS included)"
            )
        return cls(
            problem_id=problem_id,
            round=round_idx,
            prompt_ids=list(prompt_ids),
            token_ids=[int(x) for x in result.token_ids],
            logprobs=[float(x) for x in result.logprobs],
            expert_ids=result.expert_ids,
            finish_reason=result.finish_reason,
            parents=tuple(parents),
        )


def _generate_round(
    generate: Generate,
    prompts: list[list[int]],
    budget: int,
    seed: int,
) -> list[list[int]]:
    results = generate(prompts, budget, seed)
    if len(results) != len(prompts):
        raise ValueError(f"generate returned {len(results)} results for {len(prompts)} prompts")
    return [[int(x) for x in r.token_ids] for r in results]


def run_rsa(
    problems: Sequence[RSAProblem],
    generate: Generate,
    score: Scorer,
    config: RSAConfig,
    template: AggregationTemplate,
) -> RSAResult:
    """Run round 0 and config.t aggregation rounds on every problem; score and measure every round."""
    if not problems:
        raise ValueError("problems must not be empty")
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problems: problem_id values must be unique (they seed the subset choice)")
    n = config.n
    populations: list[list[list[Candidate]]] = []
    rounds: list[RoundMetrics] = []
    for round_idx in range(config.t + 1):
        if round_idx == 0:
            built = [[(list(p.prompt_ids), ()) for _ in range(n)] for p in problems]
            budget = config.beta
        else:
            last = populations[-1]
            built = [
                aggregation_prompts(p, [c.token_ids for c in cands], round_idx, config, template)
                for p, cands in zip(problems, last)
            ]
            budget = config.final_budget if round_idx == config.t else config.beta
        flat_prompts = [prompt for per_problem in built for prompt, _ in per_problem]
        outputs = _generate_round(generate, flat_prompts, budget, generation_seed(config.seed, round_idx))
        population = []
        for k, (problem, per_problem) in enumerate(zip(problems, built)):
            cands = []
            for i, (prompt, parents) in enumerate(per_problem):
                token_ids = outputs[k * n + i]
                value, answer = score(problem, token_ids)
                cands.append(Candidate(token_ids, len(prompt), parents, float(value), answer))
            population.append(cands)
        populations.append(population)
        rounds.append(round_metrics(round_idx, population, rounds[-1] if rounds else None))
    return RSAResult(config=config, problems=list(problems), populations=populations, rounds=rounds)
