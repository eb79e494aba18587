"""RL environments: where a stage's problems come from and how their completions are rewarded.

    source = environment_source(cfg.rl, seed=0)      # rl.data, or a mix of rl.environments
    question, reference = source[1234]                # a pure function of (config, seed, index, curriculum state)
    source.environment(1234)                          # the environment problem 1234 belongs to (for the metrics)
    scored = score_completions(source.verifier, completions, references)   # [Scored(reward, outcome)]

Forms of `rl.data` (and of each `rl.environments[i].data`), beyond those of zaya_train.rl.prompts:
- `rlve`: the RLVE adaptive curriculum over reasoning-gym tasks (`rl.curriculum`, zaya_train.rl.curriculum).
- `code:<jsonl>`: rows `{"question": statement, "tests": [{"input", "output"}, ...]}` (optionally
  `"all_or_nothing": true`); the completion's program runs in the sandbox (`rl.code`, zaya_train.rewards.CodeVerifier).
- `codeio_output:<jsonl>` / `codeio_input:<jsonl>`: CodeI/O output and input prediction from seeds
  `{"problem", "program", "tests"}` (zaya_train.rewards.codeio).
- `behaviour:<jsonl>`: rows `{"prompt", "constraints"}`, rewarded by the reward model `rl.reward_model`, gated by the
  instruction checker (zaya_train.rewards.behaviour).

A mix draws each problem's environment from a hash of (seed, index) with probability proportional to its share,
so it is as reproducible as a single source; its references carry the environment, and its verifier routes each
completion to that environment's verifier. `FilteredSource` restricts any source to the problems a filtering pass
kept (zaya_train.rl.filtering).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zaya_train.rewards.base import Scored
from zaya_train.rl.config import EnvironmentConfig, RLConfig
from zaya_train.rl.prompts import PromptSource, prompt_source, read_jsonl
from zaya_train.rsa.core import stable_hash64


@dataclass(frozen=True)
class EnvReference:
    """A mixed source's reference: the environment the problem came from and that environment's own reference."""

    environment: str
    reference: Any


def score_completions(verifier, completions: Sequence[str], references: Sequence[Any]) -> list[Scored]:
    """Rewards of many completions at once: verifiers that batch (a sandbox's worker pool, a reward model) get the
    whole list and report outcomes; any other verifier scores one at a time."""
    if not completions:
        return []
    batched = getattr(verifier, "score_completions", None)
    if batched is not None:
        return batched(list(completions), list(references))
    return [Scored(float(verifier.score(c, r))) for c, r in zip(completions, references)]


def floor_reward(verifier, reference: Any) -> float:
    """The reward of a rollout the canary rejects: 0 for verifiers in [0, 1]; a reward model's `fail_reward`, since
    its scores are unbounded and 0 could rank a looping rollout above a good one."""
    if isinstance(verifier, RoutingVerifier):
        verifier = verifier.verifiers[reference.environment]
    return float(getattr(verifier, "fail_reward", 0.0))


class RoutingVerifier:
    """Scores each completion with the verifier of its reference's environment."""

    def __init__(self, verifiers: dict[str, Any]) -> None:
        self.verifiers = verifiers

    def score(self, completion: str, reference: EnvReference) -> float:
        return float(self.verifiers[reference.environment].score(completion, reference.reference))

    def score_completions(self, completions: list[str], references: list[EnvReference]) -> list[Scored]:
        out: list[Scored | None] = [None] * len(completions)
        for name, verifier in self.verifiers.items():
            picked = [i for i, r in enumerate(references) if r.environment == name]
            scored = score_completions(verifier, [completions[i] for i in picked],
                                       [references[i].reference for i in picked])
            for i, s in zip(picked, scored):
                out[i] = s
        return out


class MixtureSource:
    """Problem i comes from one environment, drawn by a hash of (seed, i) with probability proportional to its share;
    within it, it is that environment's problem i."""

    shuffle_rows = False

    def __init__(self, sources: dict[str, Any], shares: dict[str, float], seed: int) -> None:
        self.sources, self.seed = sources, seed
        total = sum(shares.values())
        self.names = list(sources)
        self.bounds, running = [], 0.0
        for name in self.names:
            running += shares[name] / total
            self.bounds.append(running)
        self.verifier = RoutingVerifier({name: source.verifier for name, source in sources.items()})

    def environment(self, index: int) -> str:
        u = (stable_hash64(self.seed, "environment", index) >> 11) / float(1 << 53)
        return next((n for n, b in zip(self.names, self.bounds) if u < b), self.names[-1])

    def __getitem__(self, index: int) -> tuple[str, EnvReference]:
        name = self.environment(index)
        question, reference = self.sources[name][index]
        return question, EnvReference(name, reference)

    def solution(self, index: int) -> str | None:
        return None

    def adaptive(self) -> list[Any]:
        """The sources whose problems depend on state the RL loop updates (curricula)."""
        return [s for s in self.sources.values() if hasattr(s, "observe")]


class FilteredSource:
    """`source` restricted to the problem indices in `kept`, cycled: problem i is source[kept[i % len(kept)]]."""

    def __init__(self, source, kept: list[int]) -> None:
        if not kept:
            raise ValueError("no problem is left after filtering")
        self.source, self.kept = source, kept
        self.verifier, self.seed, self.shuffle_rows = source.verifier, source.seed, False

    def _inner(self, index: int) -> int:
        return self.kept[index % len(self.kept)]

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self.source[self._inner(index)]

    def environment(self, index: int) -> str:
        return environment_of(self.source, self._inner(index))

    def solution(self, index: int) -> str | None:
        return self.source.solution(self._inner(index))


def environment_of(source, index: int) -> str:
    environment = getattr(source, "environment", None)
    return environment(index) if environment is not None else getattr(source, "name", "main")


def adaptive_sources(source) -> list[Any]:
    """Sources inside `source` (itself included) whose state the RL loop updates after every step."""
    if hasattr(source, "observe"):
        return [source]
    return source.adaptive() if hasattr(source, "adaptive") else []


def behaviour_rows(path: str):
    from zaya_train.rewards.behaviour import behaviour_rows as rows

    return rows(path)


def code_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for i, row in enumerate(read_jsonl(path)):
        tests = row.get("tests")
        if "question" not in row or not isinstance(tests, list) or not tests:
            raise ValueError(f"{path}: row {i} needs a 'question' and a non-empty 'tests' list (keys: {sorted(row)})")
        reference = {"tests": tests, "all_or_nothing": bool(row.get("all_or_nothing", False))}
        rows.append((str(row["question"]), reference))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _code_verifier(rl: RLConfig):
    from zaya_train.rewards import CodeVerifier

    code = rl.code
    return CodeVerifier(time_limit_s=code.time_limit_s, memory_mb=code.memory_mb,
                        max_output_bytes=code.max_output_bytes, max_workers=code.max_workers,
                        allow_unisolated=code.allow_unisolated)


def _behaviour_reward(rl: RLConfig):
    import torch

    from zaya_train.rewards.behaviour import BehaviouralReward
    from zaya_train.rewards.reward_model import RewardModelScorer

    rm = rl.reward_model
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    scorer = RewardModelScorer(rm.path, device=device, batch_size=rm.batch_size, max_length=rm.max_length)
    return BehaviouralReward(scorer, fail_reward=rm.fail_reward)


def _single_source(env: EnvironmentConfig, rl: RLConfig, seed: int):
    prefix, _, path = env.data.partition(":")
    if env.data == "rlve":
        from zaya_train.rl.curriculum import RLVE_DEFAULT_ENVIRONMENTS, CurriculumSource

        cur = rl.curriculum
        source = CurriculumSource(list(cur.environments) or list(RLVE_DEFAULT_ENVIRONMENTS), seed=seed,
                                  start_difficulty=cur.start_difficulty, up_threshold=cur.up_threshold,
                                  instruction=cur.instruction)
    elif prefix == "code":
        source = PromptSource(code_rows(path), _code_verifier(rl), seed, shuffle_rows=True)
    elif prefix in ("codeio_output", "codeio_input"):
        from zaya_train.rewards import codeio

        source = PromptSource(codeio.codeio_rows(path, prefix), codeio.codeio_verifier(prefix, _code_verifier(rl)), seed,
                              shuffle_rows=True)
    elif prefix == "behaviour":
        source = PromptSource(behaviour_rows(path), _behaviour_reward(rl), seed, shuffle_rows=True)
    else:
        source = prompt_source(env.data, seed)
    source.name = env.name
    return source


def environment_source(rl: RLConfig, seed: int):
    """The problems of an RL stage: `rl.data`, or the mix of `rl.environments`."""
    environments = rl.environment_list()
    if len(environments) == 1:
        return _single_source(environments[0], rl, seed)
    return MixtureSource({env.name: _single_source(env, rl, seed) for env in environments},
                         {env.name: env.share for env in environments}, seed)
